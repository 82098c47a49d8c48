"""The command group and the options several commands share."""

from __future__ import annotations

import errno
import functools
import logging
from typing import Any, Callable

import click

from ..accelerator import AcceleratorSettings, make_accelerator, show_log  # noqa: F401  (make_accelerator: the commands')
from ..data.loading import LoaderSettings, use_loader_settings
from ..errors import SynthkdError, one_line
from .options import settings_options


class SynthkdCommand(click.Command):
    """A command whose ``-h`` lists its options under headed sections (an option's ``help_group``,
    see :func:`tagged`; untagged ones last, under Options) and ends with the grammar of the model
    and dataset specs its options take (an option's ``spec``: "model" or "dataset")."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(getattr(param, "help_group", None) or "Options", []).append(record)
        sections["Options"] = sections.pop("Options", [])
        for title, records in sections.items():
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        kinds = {getattr(param, "spec", None) for param in self.get_params(ctx)}
        if "model" in kinds:
            from ..models.specs import model_spec_help

            with formatter.section("Model specs"):
                formatter.write_dl(model_spec_help())
        if "dataset" in kinds:
            from ..data.datasets import dataset_spec_help

            with formatter.section("Dataset specs"):
                formatter.write_dl(dataset_spec_help())


def tagged(*decorators: Callable, **attributes: Any) -> Callable:
    """Apply click option decorators (shown in the order listed) and set ``attributes`` on the
    options they add, where not set already: ``help_group="Teacher"`` heads their section of
    ``-h``; ``spec="dataset"`` (or "model") appends that spec grammar to it."""

    def decorate(function: Callable) -> Callable:
        before = [id(param) for param in getattr(function, "__click_params__", [])]
        function = add_options(function, list(decorators))
        for param in function.__click_params__:
            if id(param) not in before:
                for key, value in attributes.items():
                    if getattr(param, key, None) is None:
                        setattr(param, key, value)
        return function

    return decorate


class SynthkdGroup(click.Group):
    """Turns :class:`SynthkdError` and a command's usage errors into a one-line message and exit
    code 2, and closes the process group a command under ``accelerate launch`` opened (left to
    interpreter exit, gloo's threads can abort the process after the work is done)."""

    command_class = SynthkdCommand

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SynthkdError as error:
            click.echo(f"error: {one_line(error, limit=2000)}", err=True)
            ctx.exit(2)
        except click.UsageError as error:  # a command's missing or malformed option: one line, not click's three
            where = error.ctx.command_path if error.ctx is not None else ctx.command_path
            click.echo(f"error: {one_line(error.format_message(), limit=2000)} (see {where} -h)", err=True)
            ctx.exit(2)
        except OSError as error:
            problem = filesystem_problem(error)
            if problem is None:
                raise
            click.echo(f"error: {problem}", err=True)
            ctx.exit(2)
        finally:
            close_process_group()


# Where a write stopped because there is no room: each file is put in place whole (atomic_write),
# so what was written before is intact and a rerun resumes.
NO_ROOM = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
           errno.EFBIG: "a file would pass the file size limit (ulimit -f)"}
# A path that cannot be used as the command needs it.
UNUSABLE_PATH = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


def filesystem_problem(error: OSError) -> str | None:
    """The one line for a file system error any command can meet (disk full, a read-only or
    misplaced path, an unwritable HOME and its caches), or None for another error."""
    where = f" ({error.filename})" if error.filename else ""
    if error.errno in NO_ROOM:
        return (f"{NO_ROOM[error.errno]}{where}; nothing already written is lost (every file is put in place whole): "
                "make room and run the same command again to resume")
    if error.errno in UNUSABLE_PATH:
        return (f"{error.strerror or one_line(error)}{where}; use a path this command can write, a directory where one "
                "is needed (--out, --cache-dir; for the caches under HOME, a writable HOME or XDG_CACHE_HOME)")
    return None


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


def trust_code_option(function: Callable) -> Callable:
    """--trust-code: model directories this command loads may name code (FILE.py:factory,
    module:factory) in their config.json; without it only zoo architectures are built from one."""

    @functools.wraps(function)
    def command(*args: Any, trust_code: bool, **kwargs: Any) -> Any:
        from ..models import trusting_code

        with trusting_code(trust_code):
            return function(*args, **kwargs)

    return click.option("--trust-code", is_flag=True,
                        help="Let model directories whose config.json names code (FILE.py:factory, module:factory) "
                             "run it; only for directories you wrote.")(command)


def one_writer(function: Callable) -> Callable:
    """The command is the only writer of its ``--out`` directory while it runs (see
    :func:`synthkd.io.exclusive_directory`); a second one is refused with exit code 2. A
    ``--plan`` writes nothing, so it takes no lock."""

    @functools.wraps(function)
    def command(*args: Any, **kwargs: Any) -> Any:
        from ..io import exclusive_directory

        if kwargs.get("out") is None or kwargs.get("plan"):
            return function(*args, **kwargs)
        with exclusive_directory(kwargs["out"]):
            return function(*args, **kwargs)

    return command


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
        return add_options(trust_code_option(function), options)

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


RUN_GROUP = "Run"


def accelerator_options(tracking: bool = False) -> Callable:
    """``--mixed-precision`` (every command that runs a model) and, with ``tracking``, ``--tracker``
    (the commands that train or generate), passed as one :class:`AcceleratorSettings` ``device``."""
    return tagged(settings_options(AcceleratorSettings, "device", only=None if tracking else ("mixed_precision",)),
                  help_group=RUN_GROUP)


@click.group(cls=SynthkdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="synthkd")
@click.option("-v", "--verbose", count=True, help="More log lines (-v: debug, e.g. each shard and the accelerator set-up).")
@click.option("-q", "--quiet", count=True, help="Fewer log lines (-q: warnings only, -qq: errors only); results still print.")
def main(verbose: int, quiet: int) -> None:
    """Distill image classifiers without their training data."""
    show_log(max(logging.DEBUG, logging.INFO + 10 * (quiet - verbose)))
