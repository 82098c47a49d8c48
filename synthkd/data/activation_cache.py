"""The teacher's activations at every cut, computed once and read by each neighbourhood: the
same resumable, checksummed store as synthetic sets (:mod:`synthkd.data.writer`).

Boundary 0 is the normalised input image, boundary k the teacher's activation after cut k, the
last one its logits; neighbourhood k learns boundary k -> k+1. Every image is stored in
``views`` versions (view 0 as made, the others augmented), so training needs no teacher at all.

Layout::

    run.json                              teacher, set, cuts, views, dtype (a resume or a
                                          reuse with any other is refused, naming the key)
    b-03/v00-shard-00000.safetensors      boundary 3 of view 0's first shard ("activations")
    progress/rank-{r}.json, manifest.json as in every set

The cache is split by rank: each boundary is made by one rank, its *builder* (the rank that
trains the neighbourhood whose target it is, :func:`boundary_builders`), from the boundary before
it as stored, whichever rank made that one. So the teacher runs once over the set, each rank runs
only the teacher pieces of its own neighbourhoods and writes only their targets, and a rank that
trains neighbourhood k reads only the files of boundaries k and k+1. For a student born from the
teacher a boundary holds only the channels the student keeps at its cut (``kept_channels`` in
run.json); the teacher's next piece needs them all, so a rank recomputes such a boundary from the
last one stored whole (:func:`computed_boundaries`). The directory is shared by
the ranks (one machine, or a shared file system).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from synthkd.errors import SynthkdError

from .format import ACTIVATION_CACHE, CACHE_TENSORS, load_shard
from .reader import open_manifest, read_listed_shard
from .writer import ShardStore

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_bytes(shapes: list[tuple[int, ...]], num_images: int, views: int, dtype: str) -> int:
    """Bytes of the tensors of a cache, or of some of its boundaries (the files add a few hundred
    bytes each)."""
    per_image = sum(math.prod(shape) for shape in shapes)
    return per_image * num_images * views * DTYPES[dtype].itemsize


def boundaries_of(neighbourhoods: list[int]) -> list[int]:
    """The boundaries that training ``neighbourhoods`` reads: k (input) and k+1 (target) of each."""
    return sorted({b for k in neighbourhoods for b in (k, k + 1)})


def boundary_builders(needed: list[list[int]], num_boundaries: int) -> list[int]:
    """The rank that makes each boundary, from the neighbourhoods each rank trains (``needed[r]``):
    the first rank whose target it is (boundary b is neighbourhood b-1's target), else the first
    whose input it is, else the builder of the boundary before it (rank 0 for the image), so every
    rank computes only the teacher pieces of the neighbourhoods it trains."""
    builders: list[int] = []
    for b in range(num_boundaries):
        targets = [r for r, owned in enumerate(needed) if b - 1 in owned]
        inputs = [r for r, owned in enumerate(needed) if b in owned]
        builders.append(min(targets or inputs or [builders[-1] if builders else 0]))
    return builders


def computed_boundaries(made: list[int], sliced: list[bool]) -> list[int]:
    """The boundaries a rank computes to make ``made``: those, and below each every boundary stored
    with only some channels (``sliced[b]``: a born student's kept ones), down to one stored whole
    or made by this rank: the teacher's next piece needs the whole activation."""
    computed = set(made)
    for b in made:
        below = b - 1
        while below >= 0 and below not in computed and sliced[below]:
            computed.add(below)
            below -= 1
    return sorted(computed)


class ActivationCacheWriter(ShardStore):
    """Plans a cache of ``len(shapes)`` boundaries x ``views`` x shards and writes it resumably."""

    FORMAT = ACTIVATION_CACHE
    FILE_PATTERN = r"b-(\d{2,})/v(\d{2,})-shard-(\d{5,})\.safetensors"
    TENSORS = CACHE_TENSORS

    def __init__(self, out_dir: str | os.PathLike, record: dict[str, Any], shapes: list[tuple[int, ...]],
                 num_images: int, shard_size: int, views: int, dtype: str, builders: list[int],
                 accelerator=None) -> None:
        """``builders``: the rank that makes each boundary (:func:`boundary_builders`)."""
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.builders = list(builders)
        self.num_images, self.shard_size, self.views = int(num_images), int(shard_size), int(views)
        self.dtype = DTYPES[dtype]
        self.num_shards = math.ceil(self.num_images / self.shard_size)
        record = {**record, "format": ACTIVATION_CACHE.name, "version": ACTIVATION_CACHE.version,
                  "num_images": self.num_images, "shard_size": self.shard_size, "views": self.views, "dtype": dtype,
                  "shapes": [list(s) for s in self.shapes]}
        super().__init__(out_dir, record, len(self.shapes) * self.views * self.num_shards, accelerator)

    def _split(self, job: int) -> tuple[int, int, int]:
        """(boundary, view, shard) of a job."""
        boundary, unit = divmod(job, self.views * self.num_shards)
        return (boundary, *divmod(unit, self.num_shards))

    def share(self, remaining: list[int]) -> list[int]:
        return [job for job in remaining if self.builders[self._split(job)[0]] == self.rank]

    def pending(self) -> dict[tuple[int, int], list[int]]:
        """This rank's (view, shard) units still to make, each with its missing boundaries in order."""
        units: dict[tuple[int, int], list[int]] = {}
        for job in self.pending_jobs():
            boundary, view, shard = self._split(job)
            units.setdefault((view, shard), []).append(boundary)
        return units

    def shard_rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min(self.num_images, (shard + 1) * self.shard_size))

    def write(self, boundary: int, view: int, shard: int, activations: torch.Tensor) -> None:
        tensor = activations.detach().to("cpu", self.dtype).contiguous()
        self.commit((boundary * self.views + view) * self.num_shards + shard, {"activations": tensor}, {})

    def read(self, boundary: int, view: int, shard: int) -> torch.Tensor:
        """A committed shard of a boundary, as stored (waiting for the rank that makes it)."""
        job = (boundary * self.views + view) * self.num_shards + shard
        return load_shard(self.committed_file(job), CACHE_TENSORS)["activations"]

    def job_file(self, job: int) -> str:
        boundary, view, shard = self._split(job)
        return f"b-{boundary:02d}/v{view:02d}-shard-{shard:05d}.safetensors"

    def job_of(self, match: re.Match) -> int:
        boundary, view, shard = (int(g) for g in match.groups())
        if view >= self.views or shard >= self.num_shards:
            return -1
        return (boundary * self.views + view) * self.num_shards + shard

    def job_count(self, job: int) -> int:
        return len(self.shard_rows(self._split(job)[2]))

    def check_tensors(self, job: int, tensors: dict[str, torch.Tensor]) -> None:
        boundary, view, shard = self._split(job)
        activations = tensors["activations"]
        expected = (self.job_count(job), *self.shapes[boundary])
        if tuple(activations.shape) != expected or activations.dtype != self.dtype:
            raise ValueError(f"boundary {boundary}, view {view}, shard {shard} has shape {tuple(activations.shape)} "
                             f"{activations.dtype}, not {expected} {self.dtype}")
        if not bool(torch.isfinite(activations).all()):
            raise ValueError(f"boundary {boundary}, view {view}, shard {shard} is not finite")

    def build_manifest(self, entries: list[dict]) -> dict:
        return {**self.record, "shards": [{key: entry[key] for key in ("file", "sha256", "count", "rank")} for entry in entries]}

    def manifest_shards(self, manifest: dict) -> list[dict]:
        return list(manifest["shards"])


class ActivationCache:
    """A finished cache; :meth:`boundary` reads one boundary's files only (checksums verified)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest = open_manifest(self.path, ACTIVATION_CACHE)
        self.views, self.num_images = int(self.manifest["views"]), int(self.manifest["num_images"])
        self.shapes = [tuple(s) for s in self.manifest["shapes"]]

    def boundary(self, boundary: int, verify: bool = True) -> torch.Tensor:
        """Boundary ``boundary`` of every view, view-major: row ``view * num_images + image``."""
        prefix = f"b-{boundary:02d}/"
        shards = sorted((s for s in self.manifest["shards"] if s["file"].startswith(prefix)), key=lambda s: s["file"])
        if not shards:
            raise SynthkdError(f"{self.path} has no boundary {boundary}; delete the cache to rebuild it")
        parts = [read_listed_shard(self.path, shard, CACHE_TENSORS, verify, ACTIVATION_CACHE)["activations"]
                 for shard in shards]
        stacked = torch.cat(parts)
        if tuple(stacked.shape) != (self.views * self.num_images, *self.shapes[boundary]):
            raise SynthkdError(f"{self.path}: boundary {boundary} has shape {tuple(stacked.shape)}; delete the cache to rebuild it")
        return stacked
