"""On-disk format of a per-neighbourhood activation set (``generate --method activations``).

Layout::

    run.json                      settings (method config, cuts, teacher, sizes), written first;
                                  a resume with other settings is refused
    nb-00/shard-00000.safetensors inputs of neighbourhood 0 ("inputs": N x input shape, float32)
    nb-01/shard-00000.safetensors ... one folder per neighbourhood, fixed-size shards
    manifest.json                 written last: per neighbourhood, its shards with sha256

Every shard is written atomically, so a shard file that exists is complete: a stopped run
resumes by making the missing ones. Jobs (neighbourhood, shard) are split round-robin across
ranks and need no communication. Only safetensors and JSON, no pickle.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from synthkd.errors import SynthkdError
from synthkd.io import atomic_write, atomic_write_json, differences, read_json, sha256_file

from .shards import _plain_json, shard_name

FORMAT = "synthkd-activations"
VERSION = 1


def neighbourhood_dir(k: int) -> str:
    return f"nb-{k:02d}"


class ActivationWriter:
    """Plans an activation set (``num_inputs`` per neighbourhood in shards) and writes it resumably."""

    def __init__(self, out_dir: str | os.PathLike, record: dict[str, Any], input_shapes: list[tuple[int, ...]],
                 num_inputs: int, shard_size: int, accelerator) -> None:
        self.out_dir = Path(out_dir)
        self.input_shapes = [tuple(int(d) for d in s) for s in input_shapes]
        self.num_inputs, self.shard_size = int(num_inputs), int(shard_size)
        self.num_shards = math.ceil(self.num_inputs / self.shard_size)
        self.accelerator = accelerator
        self.record = _plain_json({**record, "format": FORMAT, "version": VERSION, "num_inputs": self.num_inputs,
                                   "shard_size": self.shard_size, "input_shapes": [list(s) for s in self.input_shapes]},
                                  "settings")
        run = self.out_dir / "run.json"
        # A non-empty directory without run.json is refused below on every rank (no rank waits alone).
        if accelerator.is_main_process and not run.exists() and not (self.out_dir.is_dir() and any(self.out_dir.iterdir())):
            atomic_write_json(run, self.record)
        accelerator.wait_for_everyone()
        if not run.is_file():
            raise SynthkdError(f"{self.out_dir} is not empty and holds no activation set; use a new --out directory")
        try:
            mismatches = differences(read_json(run), self.record)
        except ValueError as error:  # unreadable JSON
            mismatches = [f"run.json is unreadable ({error})"]
        if mismatches:
            raise SynthkdError(f"{self.out_dir} holds an activation set with other settings (existing run -> now: {'; '.join(mismatches)}); "
                               "use a new --out directory or delete it (nothing was overwritten)")

    def shard_path(self, k: int, shard: int) -> Path:
        return self.out_dir / neighbourhood_dir(k) / shard_name(shard)

    def shard_count(self, shard: int) -> int:
        return min(self.shard_size, self.num_inputs - shard * self.shard_size)

    def _complete(self, k: int, shard: int) -> bool:
        path = self.shard_path(k, shard)
        if not path.is_file():
            return False
        try:
            inputs = load_file(str(path))["inputs"]
        except Exception:  # damaged: make it again
            return False
        return tuple(inputs.shape) == (self.shard_count(shard), *self.input_shapes[k])

    def pending(self) -> list[tuple[int, int]]:
        """This rank's (neighbourhood, shard) jobs still to make."""
        jobs = [(k, s) for k in range(len(self.input_shapes)) for s in range(self.num_shards)]
        jobs = jobs[self.accelerator.process_index :: self.accelerator.num_processes]
        return [job for job in jobs if not self._complete(*job)]

    def write(self, k: int, shard: int, inputs: torch.Tensor) -> None:
        inputs = inputs.detach().to("cpu", torch.float32).contiguous()
        if tuple(inputs.shape) != (self.shard_count(shard), *self.input_shapes[k]) or not bool(torch.isfinite(inputs).all()):
            raise ValueError(f"inputs for neighbourhood {k}, shard {shard} have shape {tuple(inputs.shape)} or are not finite")
        atomic_write(self.shard_path(k, shard), lambda tmp: save_file({"inputs": inputs}, tmp))

    def finalize(self) -> dict[str, Any]:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            missing = [f"{neighbourhood_dir(k)}/{shard_name(s)}" for k in range(len(self.input_shapes))
                       for s in range(self.num_shards) if not self._complete(k, s)]
            if missing:
                raise SynthkdError(f"{self.out_dir} misses {', '.join(missing[:3])}; rerun the same command to make them")
            neighbourhoods = [
                [{"file": f"{neighbourhood_dir(k)}/{shard_name(s)}", "sha256": sha256_file(self.shard_path(k, s)),
                  "count": self.shard_count(s)} for s in range(self.num_shards)]
                for k in range(len(self.input_shapes))
            ]
            atomic_write_json(self.out_dir / "manifest.json", {**self.record, "neighbourhoods": neighbourhoods})
        self.accelerator.wait_for_everyone()
        return read_json(self.out_dir / "manifest.json")


class ActivationDataset(Dataset):
    """A finished activation set; item i is the tuple of input i of every neighbourhood."""

    def __init__(self, path: str | os.PathLike, verify: bool = True) -> None:
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise SynthkdError(
                f"{self.path} is not a finished activation set (no manifest.json); make one with "
                "`synthkd generate --method activations --out DIR` (rerunning it resumes an interrupted one)"
            )
        manifest = read_json(manifest_path)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise SynthkdError(f"{manifest_path} is not a synthkd activation-set manifest (version {VERSION}); "
                               "make one with `synthkd generate --method activations`")
        self.manifest = manifest
        self.inputs: list[torch.Tensor] = []
        for k, shards in enumerate(manifest["neighbourhoods"]):
            parts = []
            for shard in shards:
                file = self.path / shard["file"]
                fix = f"delete {file} and rerun the same `synthkd generate --method activations` command"
                if not file.is_file() or (verify and sha256_file(file) != shard["sha256"]):
                    raise SynthkdError(f"{file} is missing or corrupt (checksum mismatch); {fix}")
                parts.append(load_file(str(file))["inputs"])
            self.inputs.append(torch.cat(parts))
            if tuple(self.inputs[-1].shape[1:]) != tuple(manifest["input_shapes"][k]):
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
        return tuple(inputs[index] for inputs in self.inputs)
