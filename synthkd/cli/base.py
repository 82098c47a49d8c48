"""The command group and the options several commands share."""

from __future__ import annotations

import functools
from typing import Any, Callable

import click

from ..data.loading import LoaderSettings, use_loader_settings
from ..errors import SynthkdError
from .options import settings_options


class SynthkdGroup(click.Group):
    """Turns :class:`SynthkdError` into a one-line message and exit code 2, and closes the
    process group a command under ``accelerate launch`` opened (left to interpreter exit, gloo's
    threads can abort the process after the work is done)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SynthkdError as error:
            click.echo(f"error: {error}", err=True)
            ctx.exit(2)
        finally:
            close_process_group()


def close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def parse_floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}")


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected C,H,W, got {text!r}")
    if len(shape) != 3:
        raise click.BadParameter(f"expected C,H,W, got {text!r}")
    return shape


def add_options(function: Callable, options: list[Callable]) -> Callable:
    """Apply click option decorators so they show in ``--help`` in the order listed."""
    for option in reversed(options):
        function = option(function)
    return function


def model_options(name: str, weights_flag: str) -> Callable:
    """--NAME plus the flags that describe a model given as code: weights and input format."""

    def decorate(function: Callable) -> Callable:
        options = [
            click.option(f"--{name}", "model_spec", required=True,
                         help="Model directory; a model source: torchvision:NAME, timm:NAME, hf:DIR_OR_ID, hub:DIR:ENTRY, "
                              "each with builder arguments after ?, e.g. 'torchvision:resnet18?weights=DEFAULT'; "
                              "or FILE.py:factory / package.module:factory."),
            click.option(weights_flag, "weights", type=click.Path(dir_okay=False),
                         help="Weights for a model given as code or source (safetensors or a weights-only state dict)."),
            click.option("--input-shape", callback=lambda c, p, v: parse_shape(v),
                         help="C,H,W of a model given as code (overrides what a model source says)."),
            click.option("--mean", callback=lambda c, p, v: parse_floats(v),
                         help="Normalisation mean, one or per channel (overrides a model source's)."),
            click.option("--std", callback=lambda c, p, v: parse_floats(v),
                         help="Normalisation std, one or per channel (overrides a model source's)."),
        ]
        return add_options(function, options)

    return decorate


def loader_options(function: Callable) -> Callable:
    """``--num-workers`` (:class:`LoaderSettings`), applied before the command runs."""
    @settings_options(LoaderSettings, "loader")
    @functools.wraps(function)
    def command(*args: Any, loader: Any, **kwargs: Any) -> Any:
        use_loader_settings(loader)
        return function(*args, **kwargs)

    return command


def open_model(model_spec: str, weights: str | None, input_shape, mean, std):
    from ..models import load_model

    return load_model(model_spec, weights, input_shape, mean, std)


def make_accelerator(mixed_precision: str = "no", log_with: str | None = None, project_dir: str | None = None):
    from ..accelerator import make_accelerator as make

    return make(mixed_precision, log_with, project_dir)


mixed_precision_option = click.option(
    "--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="no", show_default=True,
    help="Autocast on GPU.",
)


@click.group(cls=SynthkdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="synthkd")
def main() -> None:
    """Distill image classifiers without their training data."""
