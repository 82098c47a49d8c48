"""The Accelerator every stage uses, set up the same way from the CLI, the Python API, pipelines and
benchmarks; its settings (mixed precision, a tracker); and the one way a loop reports progress
(:func:`log_progress`: the terminal's log and the trackers, live)."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from .errors import SynthkdError
from .io import flatten
from .settings import Settings, setting

LOGGER_NAME = "synthkd"
logger = get_logger(LOGGER_NAME)  # logs on the main process only

# Accelerate's trackers (accelerate.utils.LoggerType less "all"); each needs its own package.
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "trackio", "swanlab")


def mixed_precision_setting() -> Any:
    """The ``mixed_precision`` field, shared by the commands' options and ``synthkd run``'s YAML key."""
    return setting(None, choices=("no", "fp16", "bf16"),
                   help="Autocast precision. Default: Accelerate's, "
                        "i.e. `accelerate launch --mixed_precision` or `accelerate config` (env "
                        "ACCELERATE_MIXED_PRECISION), else no.")


@dataclass
class AcceleratorSettings(Settings):
    """How a command runs its models: autocast precision and where live training curves go."""

    mixed_precision: Literal["no", "fp16", "bf16"] | None = mixed_precision_setting()
    tracker: str | None = setting(None, choices=TRACKERS,
                                  help="Send the training curves, live (per epoch or shard), to this Accelerate "
                                       "tracker (its package must be installed; tensorboard writes under "
                                       "OUT/trackers).")


def accelerate_precision(mixed_precision: str | None) -> str:
    """The precision an Accelerator made with ``mixed_precision`` runs at: itself, or for None
    Accelerate's choice (ACCELERATE_MIXED_PRECISION, which `accelerate launch` sets from its flag
    or from `accelerate config`), else "no"."""
    from accelerate.utils import parse_choice_from_env

    return mixed_precision or parse_choice_from_env("ACCELERATE_MIXED_PRECISION", "no")


def training_memory_format(device: torch.device | str) -> torch.memory_format:
    """The layout a model trains in on ``device``: channels-last on accelerators, where it pays,
    and contiguous on CPU. On CPU, oneDNN's AVX2 weight gradient of a stride-2 1x1 convolution in
    channels-last corrupts the heap at one thread (torch 2.13 and 2.14; see
    tests/test_native_layout.py), and at two threads channels-last was the slower layout anyway
    (benchmarks/memory_layout.py)."""
    return torch.contiguous_format if torch.device(device).type == "cpu" else torch.channels_last


def has_accelerator_device() -> bool:
    probe = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    return probe.is_available() if probe is not None else torch.cuda.is_available()


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a GPU runs asynchronously), so a timer around it
    measures the work and not its launch."""
    if device.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize(device)


def make_accelerator(mixed_precision: str | None = None, log_with: str | None = None,
                     project_dir: str | None = None) -> Accelerator:
    """An Accelerator for this machine. ``mixed_precision`` None leaves it to Accelerate (what
    ``accelerate launch`` or ``accelerate config`` set, else "no"). Without a GPU, ``accelerate
    launch --multi_gpu`` must be told to use CPU ranks: otherwise Accelerate sets up
    torch.distributed but reports a single process, and every rank acts as rank 0 and duplicates
    the work. ``log_with`` names an Accelerate tracker (``tensorboard``, ``wandb``, ...) that
    writes under ``project_dir``."""
    if log_with is not None:
        check_tracker(log_with)
    try:
        accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not has_accelerator_device(), log_with=log_with,
                                  project_dir=project_dir)
    except ValueError as error:  # e.g. another precision than this process's first Accelerator (a singleton state)
        raise SynthkdError(f"cannot set up Accelerate: {error}") from error
    logger.debug(f"accelerator: {accelerator.device}, {accelerator.num_processes} process(es), "
                 f"mixed precision {accelerator.mixed_precision}")
    return accelerator


def check_tracker(name: str) -> None:
    from accelerate.tracking import get_available_trackers

    if name not in TRACKERS:
        raise SynthkdError(f"unknown tracker {name!r}; Accelerate has {', '.join(TRACKERS)}")
    if name not in {str(getattr(t, "value", t)) for t in get_available_trackers()}:
        raise SynthkdError(f"the {name} tracker needs its package: pip install {name}")


@contextmanager
def accelerated(settings: AcceleratorSettings, project: str, out: str | os.PathLike,
                config: dict[str, Any] | None = None) -> Iterator[Accelerator]:
    """The Accelerator of one command (or API call) writing to ``out``; with ``settings.tracker``
    its trackers are opened under ``OUT/trackers`` as ``project`` (with ``config`` as
    hyperparameters) and closed at the end, and the loops inside send their records as they go
    (:func:`log_progress`)."""
    accelerator = make_accelerator(settings.mixed_precision, settings.tracker, os.path.join(out, "trackers"))
    if settings.tracker:
        accelerator.init_trackers(project, config=hyperparameters(config or {}))
    try:
        yield accelerator
    finally:
        if settings.tracker:
            accelerator.end_training()  # closes the trackers (and the process group: last)


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """Flat scalar hyperparameters, as TensorBoard's hparams want them."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str)
            for k, v in flatten(config).items()}


def log_progress(accelerator: Accelerator, phase: str, record: dict[str, Any], step_key: str = "epoch",
                 level: int = logging.INFO) -> None:
    """Report one record of a loop (an epoch, a shard) as it finishes: a line in the log (main
    process) and its other numbers as ``PHASE/KEY`` at step ``record[step_key]`` to the
    Accelerate trackers, if any: live, so a tracker shows a run while it goes."""
    numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != step_key}
    accelerator.log({re.sub(r"[^-/\w.]", "_", f"{phase}/{k}"): v for k, v in numbers.items()},  # tag characters
                    step=int(record[step_key]))
    shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
    logger.log(level, f"{phase}: {shown}")


class _StderrHandler(logging.Handler):
    """Writes to ``sys.stderr`` as it is when a record comes (not when the handler was made), so a
    run log that redirects stderr (``synthkd run``) or a test runner capturing it gets the lines;
    through ``tqdm.write``, so a progress bar is redrawn below the line instead of through it."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(_Formatter())

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class _Formatter(logging.Formatter):
    """Progress lines as they are (less the ``[RANK 0]`` of the main process's lines); anything
    but INFO prefixed with its level."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().removeprefix("[RANK 0] ")
        return message if record.levelno == logging.INFO else f"synthkd: {record.levelname.lower()}: {message}"


def no_progress_bars(accelerator: Accelerator) -> bool:
    """Whether this process draws no progress bars: only the local main process draws them, and
    none once the log was quietened below INFO (``synthkd -q``)."""
    return not accelerator.is_local_main_process or logging.getLogger(LOGGER_NAME).level > logging.INFO


def progress_bar(accelerator: Accelerator, iterable: Any = None, **options: Any) -> Any:
    """A tqdm bar drawn by the local main process on a terminal only: a redirected log gets
    :func:`log_progress`'s line per epoch or shard instead of carriage-return frames, and
    ``synthkd -q`` or TQDM_DISABLE=1 draws none."""
    from tqdm.auto import tqdm

    off = no_progress_bars(accelerator) or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(iterable, disable=True if off else None, mininterval=1.0, **options)


# Progress bars of the Hugging Face libraries, by the module that switches them off and its function.
_LIBRARY_PROGRESS = (("datasets.utils.logging", "disable_progress_bar"), ("huggingface_hub.utils", "disable_progress_bars"),
                     ("transformers.utils.logging", "disable_progress_bar"))


def show_log(level: int) -> None:
    """Send synthkd's log records of ``level`` and above to stderr (the CLI's ``-v``/``-q``);
    below INFO the Hugging Face libraries' progress bars go quiet too."""
    package = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _StderrHandler) for h in package.handlers):
        package.addHandler(_StderrHandler())
    package.setLevel(level)
    if level > logging.INFO:
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        for module, switch in _LIBRARY_PROGRESS:
            if module in sys.modules:  # imported already, so the variables above came too late
                getattr(sys.modules[module], switch)()


@contextmanager
def log_shown_from(level: int) -> Iterator[None]:
    """Within: records of ``level`` and above shown on stderr even where the caller asked for
    less (a run log keeps the progress lines); the caller's level is restored after."""
    package = logging.getLogger(LOGGER_NAME)
    saved, handlers = package.level, list(package.handlers)
    show_log(min(package.getEffectiveLevel(), level))
    try:
        yield
    finally:
        package.setLevel(saved)
        package.handlers[:] = handlers
