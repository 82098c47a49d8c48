"""Commands of the data-free slice: train a teacher, generate, distill, demo."""

from __future__ import annotations

import json

import click

from synthkd.pipelines.distill import DistillSettings, StudentSettings
from synthkd.pipelines.train_teacher import TeacherSettings

from ..errors import SynthkdError
from .base import main, make_accelerator, mixed_precision_option, model_options, open_model
from .options import settings_options
from .diffusion import build_selection, diffusion_options, echo_report, selection_options
from .fast import activation_options, fast_generator_options, synthesis_options


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
@click.option("--method", type=click.Choice(["inversion", "fast", "diffusion", "activations"]), default="inversion",
              show_default=True,
              help="inversion: optimise pixels; fast: a meta-learned generator, a few steps per batch; diffusion: sample "
                   "--pipeline; activations: each neighbourhood's input activations (for distill --inputs activations).")
@click.option("--num-images", type=int, required=True)
@click.option("--iterations", type=int, default=100, show_default=True, help="Optimisation steps per batch.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Images per batch (and per shard).")
@click.option("--lr", type=float, default=0.25, show_default=True, help="Adam learning rate on [0,1] pixels.")
@click.option("--bn-weight", type=float, default=1.0, show_default=True, help="BatchNorm-statistics loss weight.")
@click.option("--first-bn-weight", type=float, default=10.0, show_default=True, help="Extra weight of the first BN layer.")
@click.option("--ce-weight", type=float, default=1.0, show_default=True, help="Cross-entropy to the target classes.")
@click.option("--tv-weight", type=float, default=1.0, show_default=True, help="Total-variation prior.")
@click.option("--l2-weight", type=float, default=0.0, show_default=True, help="l2 image prior.")
@click.option("--jitter", type=float, default=0.1, show_default=True, help="Random shift per step, fraction of the size.")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Random horizontal flips per step.")
@click.option("--crop-scale", type=float, default=0.8, show_default=True, help="Smallest area of the random crop (1: none).")
@click.option("--competition-weight", type=float, default=0.0, show_default=True,
              help="Adaptive DeepInversion term: seek inputs where --student disagrees with the teacher.")
@click.option("--student", type=click.Path(exists=True, file_okay=False), help="Student model directory for the competition term.")
@diffusion_options
@selection_options
@click.option("--seed", type=int, default=0, show_default=True)
@mixed_precision_option
@fast_generator_options
@activation_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Synthetic set directory (resumes if it exists).")
def generate(model_spec, weights, input_shape, mean, std, method, num_images, iterations, batch_size, lr, bn_weight,
             first_bn_weight, ce_weight, tv_weight, l2_weight, jitter, flip, crop_scale, competition_weight, student,
             diffusion, selection, seed, mixed_precision, out, **method_options):
    """Make a synthetic training set from the teacher alone."""
    from synthkd.pipelines.generate import generate as run_generate, image_generator
    from synthkd.models import load_model

    if num_images <= 0 or batch_size <= 0 or iterations <= 0:
        raise SynthkdError("--num-images, --batch-size and --iterations must be positive")
    teacher = open_model(model_spec, weights, input_shape, mean, std)
    accelerator = make_accelerator(mixed_precision)
    teacher.to(accelerator.device)
    if method == "activations":
        from .fast import run_activations

        manifest = run_activations(teacher, num_images, batch_size, iterations, seed, out, accelerator, method_options)
        if accelerator.is_main_process:
            click.echo(f"wrote {num_images} input activations for each of {len(manifest['neighbourhoods'])} "
                       f"neighbourhoods to {out}")
        return
    competitor = load_model(student).to(accelerator.device) if student and method != "diffusion" else None
    loss = dict(bn_weight=bn_weight, first_bn_weight=first_bn_weight, ce_weight=ce_weight, tv_weight=tv_weight,
                l2_weight=l2_weight, jitter=jitter, flip=flip, crop_scale=crop_scale, competition_weight=competition_weight)
    generator = image_generator(method, teacher, loss, iterations, lr, seed, batch_size, method_options, diffusion,
                                competitor)
    manifest = run_generate(teacher, generator, num_images, out, batch_size, seed, accelerator, build_selection(selection))
    if accelerator.is_main_process:
        click.echo(f"wrote {manifest['num_images']} images in {len(manifest['shards'])} shards to {out}")
        echo_report(manifest)


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
            synthesize, inputs, **synthesis):
    """Distill a student from the teacher on a synthetic set."""
    from synthkd.pipelines.distill import build_student, distill as run_distill

    teacher = open_model(model_spec, weights, input_shape, mean, std)
    if synthesize != "none" and settings.mode != "e2e":
        raise SynthkdError("--synthesize trains end to end; use --mode e2e with it")
    if inputs == "activations" and settings.mode != "neighbourhood":
        raise SynthkdError("--inputs activations feeds each neighbourhood its own inputs; use --mode neighbourhood")
    accelerator = make_accelerator(mixed_precision)
    if synthesize == "fast":
        from .fast import run_interleaved

        student_model = build_student(student.arch, teacher, student.width, seed)
        _, metrics = run_interleaved(teacher, student_model, data, out, settings.training(seed), settings.temperature,
                                     settings.flip, settings.mixup, seed, eval_dataset, accelerator, synthesis)
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
