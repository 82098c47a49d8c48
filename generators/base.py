"""The one interface of the synthetic-data stage (make [0,1] images aimed at given classes), and
what every synthetic set records: the teacher that made it and a seed per shard."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from synthkd.errors import SynthkdError
from synthkd.io import atomic_write
from synthkd.models import Classifier
from synthkd.seeds import derive_seed

STATE_NAME = "generator-state.safetensors"


class SyntheticImageGenerator(ABC):
    """A way of making inputs for a teacher. ``generate`` is called once per draw for a shard
    (once per shard unless the teacher's selection rejects images), with the targets to draw and
    a seed derived from the shard id and the draw, so a resumed run remakes a shard exactly.
    Under torch.distributed a ``collective`` generator is called the same number of times on
    every rank (a rank with nothing left passes an empty ``targets``) because some methods
    all-reduce per step."""

    method: str
    # False where ``generate`` never communicates across ranks: ranks may then call it a
    # different number of times (each fills its own shards at its own pace).
    collective: bool = True
    # False for generators that cannot aim (an unconditional diffusion model): the teacher's
    # label of each image becomes its target.
    aims_at_targets: bool = True

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The settings that determine the output; recorded in the manifest, checked on resume."""

    @abstractmethod
    def generate(self, targets: torch.Tensor, seed: int) -> torch.Tensor:
        """Images in [0,1], shape (len(targets), C, H, W) in the teacher's input format."""

    def load_state(self, directory: Path) -> None:
        """Restore what a generator carries from shard to shard (e.g. learned weights) from the
        output directory of a resumed run; a generator whose shards are independent has none."""

    def save_state(self, directory: Path) -> None:
        """Save that state atomically into the output directory (called on the main process
        after every shard round, so a killed run resumes with it)."""


def teacher_record(teacher: Classifier) -> dict[str, Any]:
    """What a synthetic set records about the teacher that made it."""
    return {
        "fingerprint": teacher.fingerprint(),
        "arch": teacher.config.arch,
        "input_shape": list(teacher.input_format.shape),
        "class_names": list(teacher.config.class_names),
    }


def shard_seed(seed: int, shard_id: int) -> int:
    """The seed of one shard of a set made with ``seed``: a resumed run remakes the shard exactly."""
    return derive_seed(seed, "shard", shard_id)


def write_generator_state(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                          **metadata: Any) -> None:
    """Save what a generator carries from shard to shard, atomically, with the settings it was
    made under (``config``) and any other ``metadata`` a resume must agree with."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    recorded = {"config": json.dumps(config, sort_keys=True), **{key: str(value) for key, value in metadata.items()}}
    atomic_write(Path(directory) / STATE_NAME, lambda tmp: save_file(tensors, tmp, metadata=recorded))


def read_generator_state(directory: Path, config: dict[str, Any],
                         **expected: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The tensors and metadata :func:`write_generator_state` saved in ``directory`` (None if
    there is no state); a state of other settings, or other ``expected`` metadata, is refused."""
    path = Path(directory) / STATE_NAME
    if not path.is_file():
        return None
    fix = f"delete {path} to restart the generator's learned state (the shards already made are kept)"
    try:
        with safe_open(str(path), framework="pt") as state:
            metadata = state.metadata() or {}
            tensors = {key: state.get_tensor(key) for key in state.keys()}
    except Exception as error:  # safetensors raises several types for a damaged file
        raise SynthkdError(f"{path} is unreadable ({error}); {fix}") from error
    if metadata.get("config") != json.dumps(config, sort_keys=True) or any(
            metadata.get(key) != str(value) for key, value in expected.items()):
        raise SynthkdError(f"{path} was written by a generator with other settings; {fix}")
    return tensors, metadata
