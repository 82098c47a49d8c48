"""On-disk format shared by synthetic image sets and activation sets: names, schema constants,
and deterministic, atomic shard files (safetensors; no pickle anywhere).

Layout of a set directory::

    run.json                  written first by the main process: the settings, to refuse a
                              resume with different ones
    shard-00000.safetensors   an image set: images (N,C,H,W float32 in [0,1]), logits (N,K
                              float32), targets (N int64), one file per global shard id
    nb-00/shard-00000.safetensors
                              an activation set: inputs of neighbourhood 0 (N x its input shape)
    progress/rank-{r}.json    shards finished by rank r (file, count, sha256), so a killed run
                              resumes with any number of ranks
    manifest.json             written last: its presence means the set is complete

Shard ids are fixed by the set's size and shard size, never by the number of processes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from synthkd.io import atomic_write



class SetFormat(NamedTuple):
    """A kind of set: its manifest's ``format`` and ``version``, and how messages name it."""

    name: str
    version: int
    noun: str
    command: str  # what makes (and resumes) one


SYNTHETIC = SetFormat("synthkd-synthetic", 1, "synthetic set", "synthkd generate")
ACTIVATIONS = SetFormat("synthkd-activations", 1, "activation set", "synthkd generate --method activations")
ACTIVATION_CACHE = SetFormat("synthkd-activation-cache", 1, "activation cache", "synthkd distill --mode neighbourhood")
MANIFEST_NAME = "manifest.json"
RUN_NAME = "run.json"
PROGRESS_DIR = "progress"
IMAGE_TENSORS = ("images", "logits", "targets")
ACTIVATION_TENSORS = ("inputs",)
CACHE_TENSORS = ("activations",)
SHARD_PATTERN = r"shard-(\d{5,})\.safetensors"
_SHARD_RE = re.compile(f"^{SHARD_PATTERN}$")
_PROGRESS_RE = re.compile(r"^rank-(\d+)\.json$")


def shard_name(shard_id: int) -> str:
    """File name of a global shard id; the id, not the rank, names it so resumes line up."""
    return f"shard-{shard_id:05d}.safetensors"


def shard_id(name: str) -> int | None:
    """The shard id a file name carries, or None for any other file."""
    match = _SHARD_RE.match(name)
    return int(match.group(1)) if match else None


def neighbourhood_dir(k: int) -> str:
    """Folder of neighbourhood ``k``'s shards in an activation set."""
    return f"nb-{k:02d}"


def progress_name(rank: int) -> str:
    return f"rank-{rank}.json"


def progress_rank(name: str) -> int | None:
    """The rank a progress file belongs to, or None for any other file."""
    match = _PROGRESS_RE.match(name)
    return int(match.group(1)) if match else None


def plain_json(value: Any, what: str) -> Any:
    """Round-trip through JSON so tuples/lists compare equal to what a resume reads back."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be JSON-serialisable to be recorded in run.json: {error}") from error


def shard_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file whose bytes depend only on its contents: safetensors writes its
    metadata in hash order, which varies between processes, so the header is rewritten with
    the metadata keys sorted (identical runs then give identical sha256)."""
    data = save(tensors, metadata=metadata or None)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    stored = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(stored.items()))} if stored else {}
    text = json.dumps({**ordered, **header}, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    return len(text).to_bytes(8, "little") + text + data[8 + length :]


def save_shard(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a shard atomically (a shard file that exists is complete) and deterministically."""
    data = shard_bytes(tensors, metadata)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def load_shard(path: str | Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Load a shard's tensors; raises on anything that is not a readable safetensors file with ``keys``."""
    tensors = load_file(str(path))
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise ValueError(f"missing tensors {missing}")
    return tensors


def shard_report(path: str | Path) -> dict | None:
    """The report a shard carries in its metadata, if any (for shards adopted on resume)."""
    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get("report")
    return json.loads(text) if text else None


def sum_reports(reports: list[dict]) -> dict:
    """Numbers added, lists added element-wise, over the shards' reports."""
    total: dict[str, Any] = {}
    for report in reports:
        for key, value in report.items():
            if isinstance(value, list):
                previous = total.get(key, [0] * len(value))
                total[key] = [a + b for a, b in zip(previous, value)]
            else:
                total[key] = total.get(key, 0) + value
    return total
