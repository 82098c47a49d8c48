"""Per-neighbourhood activation sets (``generate --method activations``): the same resumable
store as image sets (:mod:`synthkd.data.writer`), one folder of shards per neighbourhood.

Layout::

    run.json                      settings (method config, cuts, teacher, sizes), written first;
                                  a resume with other settings is refused
    nb-00/shard-00000.safetensors inputs of neighbourhood 0 ("inputs": N x input shape, float32)
    nb-01/shard-00000.safetensors ... one folder per neighbourhood, fixed-size shards
    progress/rank-{r}.json        shards finished by rank r
    manifest.json                 written last: per neighbourhood, its shards with sha256

Jobs (neighbourhood, shard) are numbered ``k * num_shards + shard`` and split round-robin.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from synthkd.errors import SynthkdError

from .format import ACTIVATION_TENSORS, ACTIVATIONS, SHARD_PATTERN, neighbourhood_dir, shard_name
from .reader import open_manifest, read_listed_shard
from .writer import ShardStore


class ActivationWriter(ShardStore):
    """Plans an activation set (``num_inputs`` per neighbourhood in shards) and writes it resumably."""

    FORMAT = ACTIVATIONS
    FILE_PATTERN = rf"nb-(\d{{2,}})/{SHARD_PATTERN}"
    TENSORS = ACTIVATION_TENSORS

    def __init__(self, out_dir: str | os.PathLike, record: dict[str, Any], input_shapes: list[tuple[int, ...]],
                 num_inputs: int, shard_size: int, accelerator=None) -> None:
        self.input_shapes = [tuple(int(d) for d in s) for s in input_shapes]
        self.num_inputs, self.shard_size = int(num_inputs), int(shard_size)
        self.num_shards = math.ceil(self.num_inputs / self.shard_size)
        record = {**record, "format": ACTIVATIONS.name, "version": ACTIVATIONS.version, "num_inputs": self.num_inputs,
                  "shard_size": self.shard_size, "input_shapes": [list(s) for s in self.input_shapes]}
        super().__init__(out_dir, record, len(self.input_shapes) * self.num_shards, accelerator)

    def shard_count(self, shard: int) -> int:
        return min(self.shard_size, self.num_inputs - shard * self.shard_size)

    def pending(self) -> list[tuple[int, int]]:
        """This rank's (neighbourhood, shard) jobs still to make."""
        return [divmod(job, self.num_shards) for job in self.pending_jobs()]

    def write(self, k: int, shard: int, inputs: torch.Tensor) -> None:
        inputs = inputs.detach().to("cpu", torch.float32).contiguous()
        self.commit(k * self.num_shards + shard, {"inputs": inputs}, {})

    # ------------------------------------------------------------------ the kind of set
    def job_file(self, job: int) -> str:
        k, shard = divmod(job, self.num_shards)
        return f"{neighbourhood_dir(k)}/{shard_name(shard)}"

    def job_of(self, match: re.Match) -> int:
        return int(match.group(1)) * self.num_shards + int(match.group(2))

    def job_count(self, job: int) -> int:
        return self.shard_count(job % self.num_shards)

    def check_tensors(self, job: int, tensors: dict[str, torch.Tensor]) -> None:
        k, shard = divmod(job, self.num_shards)
        inputs = tensors["inputs"]
        if tuple(inputs.shape) != (self.shard_count(shard), *self.input_shapes[k]) or inputs.dtype != torch.float32:
            raise ValueError(f"inputs for neighbourhood {k}, shard {shard} have shape {tuple(inputs.shape)}, "
                             f"not {(self.shard_count(shard), *self.input_shapes[k])} float32")
        if not bool(torch.isfinite(inputs).all()):
            raise ValueError(f"inputs for neighbourhood {k}, shard {shard} are not finite")

    def build_manifest(self, entries: list[dict]) -> dict:
        shards = [{key: entry[key] for key in ("file", "sha256", "count")} for entry in entries]
        per_neighbourhood = [shards[k * self.num_shards : (k + 1) * self.num_shards] for k in range(len(self.input_shapes))]
        return {**self.record, "neighbourhoods": per_neighbourhood}

    def manifest_shards(self, manifest: dict) -> list[dict]:
        return [shard for shards in manifest["neighbourhoods"] for shard in shards]


class ActivationDataset(Dataset):
    """A finished activation set; item i is the tuple of input i of every neighbourhood."""

    def __init__(self, path: str | os.PathLike, verify: bool = True) -> None:
        self.path = Path(path)
        self.manifest = open_manifest(self.path, ACTIVATIONS)
        self.inputs: list[torch.Tensor] = []
        for k, shards in enumerate(self.manifest["neighbourhoods"]):
            parts = [read_listed_shard(self.path, shard, ACTIVATION_TENSORS, verify, ACTIVATIONS)["inputs"]
                     for shard in shards]
            self.inputs.append(torch.cat(parts))
            if tuple(self.inputs[-1].shape[1:]) != tuple(self.manifest["input_shapes"][k]):
                raise SynthkdError(f"{self.path}: neighbourhood {k} inputs have the wrong shape; regenerate the set")

    @property
    def cuts(self) -> list[str]:
        return list(self.manifest["config"]["cuts"])

    @property
    def teacher_fingerprint(self) -> str:
        return self.manifest["teacher"]["fingerprint"]

    def fingerprint(self) -> str:
        return "-".join(shard["sha256"][:8] for shards in self.manifest["neighbourhoods"] for shard in shards)

    def __len__(self) -> int:
        return len(self.inputs[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        """Input ``index`` of every neighbourhood, in neighbourhood order."""
        return tuple(inputs[index] for inputs in self.inputs)
