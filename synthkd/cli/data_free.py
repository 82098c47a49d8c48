"""Commands of the data-free slice: train a teacher, generate, distill, demo."""

from __future__ import annotations

import json

import click

from synthkd.pipelines.distill import DistillSettings, StudentSettings
from synthkd.pipelines.train_teacher import TeacherSettings

from ..accelerator import accelerated
from ..errors import SynthkdError
from ..generators.inversion import InversionLossSettings, InversionSettings
from ..pipelines.generate import GenerateSettings
from ..training import KDSettings
from .base import RUN_GROUP, accelerator_options, loader_options, main, make_accelerator, model_options, one_writer, open_model, tagged
from .diffusion import echo_report
from .fast import synthesis_options
from .options import check_cli, settings_options

TEACHER_GROUP = "Teacher"

# The sections of `generate -h`: by method, keyed by the settings class (or section) declaring an option.
GENERATE_GROUPS: dict[type | str, str] = {
    InversionLossSettings: "Inversion objective (--method inversion and fast)",
    InversionSettings: "--method inversion: optimise the pixels (--iterations: also activations)",
    GenerateSettings: "The set",
    "fast": "--method fast: a meta-learned generator network",
    "diffusion": "--method diffusion: sample a diffusers pipeline",
    "activations": "--method activations: each neighbourhood's input activations",
    "selection": "Selection by the teacher (any method)",
}

# The sections of `distill -h`: what every mode takes, then each mode's own options.
DISTILL_GROUPS: dict[type | str, str] = {
    KDSettings: "Distillation (both modes)",
    DistillSettings: "Distillation (both modes)",
    "augment": "--mode e2e",
    "cuts": "--mode neighbourhood",
    "finetune_epochs": "--mode neighbourhood",
    "finetune_lr": "--mode neighbourhood",
}


@main.command("train-teacher")
@tagged(click.option("--dataset", required=True, help="Dataset spec, e.g. fashion-mnist:train."), spec="dataset")
@settings_options(TeacherSettings, "settings")
@click.option("--seed", type=int, default=0, show_default=True, help="Initial weights, batch order and augmentation.")
@tagged(click.option("--eval-dataset", help="Dataset spec evaluated after each epoch, e.g. fashion-mnist:test."),
        spec="dataset")
@accelerator_options(tracking=True)
@loader_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@one_writer
def train_teacher_command(dataset, settings, seed, eval_dataset, device, out):
    """Train a teacher on a real dataset and save it as a model directory."""
    from synthkd.pipelines.train_teacher import train_teacher

    hyperparameters = {**settings.to_dict(), "dataset": dataset, "seed": seed}
    with accelerated(device, "train-teacher", out, hyperparameters) as accelerator:
        _, metrics = train_teacher(dataset, settings, out, seed, eval_dataset, accelerator)
    if accelerator.is_main_process and "eval" in metrics:
        click.echo(f"teacher accuracy on {eval_dataset}: {metrics['eval']['accuracy']:.4f}")


@main.command()
@tagged(model_options("teacher", "--teacher-weights"), help_group=TEACHER_GROUP, spec="model")
@settings_options(GenerateSettings, "settings", groups=GENERATE_GROUPS)
@tagged(click.option("--method-option", "method_options", multiple=True, metavar="KEY=VALUE",
                     help="A setting of a registered method that has no options of its own (repeatable; the value is "
                          "read as YAML), e.g. --method toy --method-option scale=0.5."),
        help_group=GENERATE_GROUPS[GenerateSettings])
@tagged(click.option("--student", type=click.Path(exists=True, file_okay=False),
                     help="A student model directory: the competitor of the competition term (see --competition-weight)."),
        help_group=GENERATE_GROUPS[InversionLossSettings])
@tagged(click.option("--seed", type=int, default=0, show_default=True, help="Seeds every shard's draws."),
        help_group=RUN_GROUP)
@accelerator_options(tracking=True)
@tagged(click.option("--out", required=True, type=click.Path(file_okay=False),
                     help="Synthetic set directory (resumes if it exists)."), help_group=RUN_GROUP)
@one_writer
def generate(model_spec, weights, input_shape, mean, std, settings, method_options, student, seed, device, out):
    """Make a synthetic training set from the teacher alone."""
    from synthkd.models import load_model
    from synthkd.pipelines.generate import generate_set

    settings = settings.with_method_options(method_options)
    check_cli(settings)
    teacher = open_model(model_spec, weights, input_shape, mean, std)
    with accelerated(device, "generate", out, {**settings.relevant(), "seed": seed}) as accelerator:
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
@tagged(model_options("teacher", "--teacher-weights"), help_group=TEACHER_GROUP, spec="model")
@tagged(settings_options(StudentSettings, "student"), help_group="Student")
@tagged(click.option("--data", required=True, type=click.Path(),
                     help="Synthetic set directory from `synthkd generate` (or a real dataset spec, for a reference)."),
        help_group="Data", spec="dataset")
@settings_options(DistillSettings, "settings", groups=DISTILL_GROUPS)
@synthesis_options
@tagged(click.option("--seed", type=int, default=0, show_default=True, help="Initial weights, batch order and augmentation."),
        click.option("--eval-dataset", help="Dataset spec to report accuracy on, e.g. fashion-mnist:test."),
        help_group=RUN_GROUP, spec="dataset")
@accelerator_options(tracking=True)
@tagged(loader_options, help_group=RUN_GROUP)
@tagged(click.option("--out", required=True, type=click.Path(file_okay=False), help="Student model directory to write."),
        click.option("--plan", is_flag=True, help="Neighbourhood mode: print each neighbourhood's parameters, FLOPs and "
                                                  "measured step time, their balance across the ranks, the activation "
                                                  "cache's bytes per rank and the estimated time; train and write nothing."),
        click.option("--plan-ranks", type=click.IntRange(min=1),
                     help="With --plan: the number of ranks to plan for (default: the processes launched)."),
        click.option("--json", "as_json", is_flag=True, help="With --plan: print the plan as JSON."),
        help_group=RUN_GROUP)
@one_writer
def distill(model_spec, weights, input_shape, mean, std, student, data, settings, seed, eval_dataset, device, out,
            synthesis, inputs, plan, plan_ranks, as_json):
    """Distill a student from the teacher on a synthetic set."""
    from synthkd.pipelines.distill import distill as run_distill, student_for

    if (plan_ranks or as_json) and not plan:
        raise SynthkdError("--plan-ranks and --json describe the plan; use them with --plan")
    if plan:
        return print_distill_plan(model_spec, weights, input_shape, mean, std, student, data, settings, seed, device, out,
                                  inputs, plan_ranks, as_json)
    if synthesis.enabled and settings.mode != "e2e":
        raise SynthkdError("--synthesize trains end to end; use --mode e2e with it")
    if inputs == "activations" and settings.mode != "neighbourhood":
        raise SynthkdError("--inputs activations feeds each neighbourhood its own inputs; use --mode neighbourhood")
    teacher = open_model(model_spec, weights, input_shape, mean, std)
    hyperparameters = {"distill": settings.to_dict(), "student": student.to_dict(), "data": data, "seed": seed}
    if synthesis.enabled:
        hyperparameters["synthesis"] = synthesis.to_dict()
    with accelerated(device, "distill", out, hyperparameters) as accelerator:
        if synthesis.enabled:
            from synthkd.pipelines.interleave import distill_interleaved

            student_model = student_for(student, settings, teacher, seed)
            _, metrics = distill_interleaved(teacher, student_model, data, out, synthesis, settings, seed, eval_dataset,
                                             accelerator)
        else:
            _, metrics = run_distill(teacher, student, data, out, settings, seed, eval_dataset, accelerator, inputs)
    if accelerator.is_main_process and "student" in metrics:
        click.echo(
            f"teacher {metrics['teacher']['accuracy']:.4f}  student {metrics['student']['accuracy']:.4f}  "
            f"gap {metrics['gap'] * 100:.2f} points on {eval_dataset}"
        )


def print_distill_plan(model_spec, weights, input_shape, mean, std, student, data, settings, seed, device, out, inputs,
                       plan_ranks, as_json) -> None:
    """``distill --plan``: no trackers and no output directory, since nothing is written."""
    from synthkd.neighbourhood_plan import plan_lines
    from synthkd.pipelines.distill import open_training_data, plan_distillation

    if inputs != "images":
        raise SynthkdError("--plan sizes a run on images; drop --inputs activations")
    teacher = open_model(model_spec, weights, input_shape, mean, std)
    accelerator = make_accelerator(device.mixed_precision)
    num_images = len(open_training_data(data, teacher, accelerator))
    found = plan_distillation(teacher, student, num_images, out, settings, seed, plan_ranks or accelerator.num_processes,
                              accelerator)
    if accelerator.is_main_process:
        click.echo(json.dumps(found, indent=2) if as_json else "\n".join(plan_lines(found)))


@main.command()
def models() -> None:
    """List the zoo architectures, then the model sources (--teacher/--student SOURCE:NAME)."""
    from ..models import MODELS, SOURCES

    for name in MODELS.names():
        click.echo(name)
    for name in SOURCES.names():
        click.echo(SOURCES.get(name).usage)


@main.command()
@click.option("--out", default="synthkd-demo", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the teacher, the synthetic set and the student.")
@click.option("--dataset", type=click.Choice(["auto", "digits", "fashion-mnist"]), default="auto", show_default=True,
              help="auto: Fashion-MNIST where installed, else scikit-learn digits.")
@accelerator_options()
@one_writer
def demo(out, dataset, device):
    """The built-in default: teacher -> inversion -> student, all in minutes."""
    from synthkd.pipelines.demo import run_demo

    summary = run_demo(out, dataset, accelerator=make_accelerator(device.mixed_precision))
    click.echo(json.dumps(summary, indent=2))
