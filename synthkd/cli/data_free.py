"""Commands of the data-free slice: train a teacher, generate, distill, demo."""

from __future__ import annotations

import json

import click

from synthkd.pipelines.distill import DistillSettings, StudentSettings
from synthkd.pipelines.train_teacher import TeacherSettings

from ..errors import SynthkdError
from ..pipelines.generate import GenerateSettings
from .base import main, make_accelerator, mixed_precision_option, model_options, open_model
from .diffusion import echo_report
from .fast import synthesis_options
from .options import check_cli, settings_options


@main.command("train-teacher")
@click.option("--dataset", required=True, help="Dataset spec, e.g. fashion-mnist:train.")
@settings_options(TeacherSettings, "settings")
@click.option("--seed", type=int, default=0, show_default=True, help="Initial weights, batch order and augmentation.")
@click.option("--eval-dataset", help="Dataset spec evaluated after each epoch, e.g. fashion-mnist:test.")
@mixed_precision_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
def train_teacher_command(dataset, settings, seed, eval_dataset, mixed_precision, out):
    """Train a teacher on a real dataset and save it as a model directory."""
    from synthkd.pipelines.train_teacher import train_teacher

    accelerator = make_accelerator(mixed_precision)
    _, metrics = train_teacher(dataset, settings, out, seed, eval_dataset, accelerator)
    if accelerator.is_main_process and "eval" in metrics:
        click.echo(f"teacher accuracy on {eval_dataset}: {metrics['eval']['accuracy']:.4f}")


@main.command()
@model_options("teacher", "--teacher-weights")
@settings_options(GenerateSettings, "settings")
@click.option("--method-option", "method_options", multiple=True, metavar="KEY=VALUE",
              help="A setting of a registered method that has no options of its own (repeatable; the value is read "
                   "as YAML), e.g. --method toy --method-option scale=0.5.")
@click.option("--student", type=click.Path(exists=True, file_okay=False),
              help="A student model directory: the competitor of the competition term (see --competition-weight).")
@click.option("--seed", type=int, default=0, show_default=True)
@mixed_precision_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Synthetic set directory (resumes if it exists).")
def generate(model_spec, weights, input_shape, mean, std, settings, method_options, student, seed, mixed_precision, out):
    """Make a synthetic training set from the teacher alone."""
    from synthkd.models import load_model
    from synthkd.pipelines.generate import generate_set

    settings = settings.with_method_options(method_options)
    check_cli(settings)
    teacher = open_model(model_spec, weights, input_shape, mean, std)
    accelerator = make_accelerator(mixed_precision)
    competitor = load_model(student).to(accelerator.device) if student else None
    manifest = generate_set(settings, teacher, out, seed, accelerator, competitor)
    if not accelerator.is_main_process:
        return
    if "neighbourhoods" in manifest:
        click.echo(f"wrote {settings.num_images} input activations for each of {len(manifest['neighbourhoods'])} "
                   f"neighbourhoods to {out}")
    else:
        click.echo(f"wrote {manifest['num_images']} images in {len(manifest['shards'])} shards to {out}")
        echo_report(manifest)
        if "diagnostic" in manifest:
            from synthkd.generators.diagnostic import diagnostic_lines

            click.echo("\n".join(diagnostic_lines(manifest["diagnostic"])))


@main.command()
@model_options("teacher", "--teacher-weights")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Synthetic set directory.")
@click.option("--student", type=click.Path(exists=True, file_okay=False),
              help="A student model directory: adds its agreement with the teacher per class.")
@click.option("--json", "as_json", is_flag=True, help="Print the diagnostic as JSON.")
def inspect(model_spec, weights, input_shape, mean, std, data, student, as_json):
    """Per-class diagnostic of a synthetic set, no real data needed: teacher confidence, student
    agreement, feature diversity, boundary pairs covered, collapsed classes (written to
    DATA/diagnostic.json)."""
    from synthkd.generators.diagnostic import diagnose_set, diagnostic_lines
    from synthkd.models import load_model

    teacher = open_model(model_spec, weights, input_shape, mean, std)
    diagnostic = diagnose_set(data, teacher, load_model(student) if student else None)
    click.echo(json.dumps(diagnostic, indent=2) if as_json else "\n".join(diagnostic_lines(diagnostic)))


@main.command()
@model_options("teacher", "--teacher-weights")
@settings_options(StudentSettings, "student")
@click.option("--data", required=True, type=click.Path(),
              help="Synthetic set directory from `synthkd generate` (or a real dataset spec, for a reference).")
@settings_options(DistillSettings, "settings")
@click.option("--seed", type=int, default=0, show_default=True, help="Initial weights, batch order and augmentation.")
@click.option("--eval-dataset", help="Dataset spec to report accuracy on, e.g. fashion-mnist:test.")
@mixed_precision_option
@synthesis_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Student model directory to write.")
def distill(model_spec, weights, input_shape, mean, std, student, data, settings, seed, eval_dataset, mixed_precision, out,
            synthesis, inputs):
    """Distill a student from the teacher on a synthetic set."""
    from synthkd.pipelines.distill import build_student, distill as run_distill

    teacher = open_model(model_spec, weights, input_shape, mean, std)
    accelerator = make_accelerator(mixed_precision)
    if synthesis.enabled and settings.mode != "e2e":
        raise SynthkdError("--synthesize trains end to end; use --mode e2e with it")
    if inputs == "activations" and settings.mode != "neighbourhood":
        raise SynthkdError("--inputs activations feeds each neighbourhood its own inputs; use --mode neighbourhood")
    if synthesis.enabled:
        from synthkd.pipelines.interleave import distill_interleaved

        student_model = build_student(student.arch, teacher, student.width, seed)
        _, metrics = distill_interleaved(teacher, student_model, data, out, synthesis, settings, seed, eval_dataset,
                                         accelerator)
    else:
        _, metrics = run_distill(teacher, student, data, out, settings, seed, eval_dataset, accelerator, inputs)
    if accelerator.is_main_process and "student" in metrics:
        click.echo(
            f"teacher {metrics['teacher']['accuracy']:.4f}  student {metrics['student']['accuracy']:.4f}  "
            f"gap {metrics['gap'] * 100:.2f} points on {eval_dataset}"
        )


@main.command()
def models() -> None:
    """List the zoo architectures."""
    from ..models import MODELS

    for name in MODELS.names():
        click.echo(name)


@main.command()
@click.option("--out", default="synthkd-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--dataset", type=click.Choice(["auto", "digits", "fashion-mnist"]), default="auto", show_default=True,
              help="auto: Fashion-MNIST where installed, else scikit-learn digits.")
def demo(out, dataset):
    """The built-in default: teacher -> inversion -> student, all in minutes."""
    from synthkd.pipelines.demo import run_demo

    summary = run_demo(out, dataset, accelerator=make_accelerator())
    click.echo(json.dumps(summary, indent=2))
