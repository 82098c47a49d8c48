"""The Accelerator every stage uses, set up the same way from the CLI, pipelines and benchmarks."""

from __future__ import annotations

import torch
from accelerate import Accelerator


def has_accelerator_device() -> bool:
    probe = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    return probe.is_available() if probe is not None else torch.cuda.is_available()


def make_accelerator(mixed_precision: str = "no", log_with: str | None = None, project_dir: str | None = None) -> Accelerator:
    """An Accelerator for this machine. Without a GPU, ``accelerate launch --multi_gpu`` must be
    told to use CPU ranks: otherwise Accelerate sets up torch.distributed but reports a single
    process, and every rank acts as rank 0 and duplicates the work. ``log_with`` names an
    Accelerate tracker (``tensorboard``, ``wandb``, ...) that writes under ``project_dir``."""
    return Accelerator(mixed_precision=mixed_precision, cpu=not has_accelerator_device(), log_with=log_with,
                       project_dir=project_dir)
