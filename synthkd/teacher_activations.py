"""The teacher's activation at every cut on a training set, computed once for all neighbourhoods.

Boundary 0 is the normalised image, boundary k the teacher's output at cut k, the last one its
logits; neighbourhood k learns boundary k -> k+1. Every image comes in ``cache_views`` views (the
image as made, then augmented ones seeded by view and shard), so the teacher never runs again
during training. Kept in memory when it fits, else in a disk cache
(:mod:`synthkd.data.activation_cache`) whose size is announced, checked against the free disk
before anything is written, and which resumes after a kill. Rows are view-major:
``view * num_images + image``.

Each boundary is computed from the one before it *as stored* (in the cache's dtype), so a target
is the teacher's output on exactly the input its neighbourhood trains on, and the disk cache can
be split by rank: each rank makes only the targets of the neighbourhoods it trains, from inputs
another rank may have made.

For a student born from the teacher by pruning, ``kept`` names the teacher's channels the student
keeps at each cut: only those are stored, and the boundary after a sliced one is computed from the
teacher's whole activation, recomputed from the last boundary stored whole (at worst the image).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torch.utils.data import DataLoader, Dataset, Subset

from .accelerator import logger
from .augment import distillation_augmentation
from .data.activation_cache import (DTYPES, ActivationCache, ActivationCacheWriter, boundaries_of, boundary_builders,
                                    cache_bytes, computed_boundaries)
from .data.activations import ActivationDataset
from .data.format import MANIFEST_NAME, RUN_NAME
from .errors import SynthkdError
from .io import read_json
from .models import Classifier
from .models.neighbourhoods import Split, activation_shapes
from .seeds import derive_seed

SHARD_SIZE = 256
MEMORY_FRACTION = 0.25  # "auto" keeps the activations in memory when they take at most this much of it


def available_memory() -> int:
    """Bytes of memory free for new allocations (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def free_disk(path: Path) -> int:
    """Free bytes on the file system that ``path`` (or its nearest existing parent) is on."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def cache_directory(config: Any, out: str | os.PathLike) -> Path:
    """Where a disk cache lives: ``cache_dir``, else scratch space in the output directory."""
    return Path(config.cache_dir) if config.cache_dir else Path(out) / "activation-cache"


def cache_location(choice: str, size: int) -> str:
    """memory or disk for a cache of ``size`` bytes: ``auto`` keeps it in memory when it takes at
    most MEMORY_FRACTION of the memory free on this machine."""
    if choice == "auto":
        return "memory" if size <= MEMORY_FRACTION * available_memory() else "disk"
    return choice


def require_free_disk(directory: Path, size: int) -> None:
    """Refuse, before anything is written, a cache that the disk under ``directory`` cannot hold."""
    free = free_disk(directory)
    if size > free:
        raise SynthkdError(
            f"the activation cache needs {human(size)} but {directory} has {human(free)} free ({human(size - free)} short); "
            "use --cache-dtype float16, fewer --cache-views, another --cache-dir or --cache memory (nothing was written)")


def require_cache_fits(directory: Path, shapes: list[tuple[int, ...]], names: list[str],
                       kept: list[list[int] | None] | None = None) -> None:
    """Refuse an existing cache whose activation at some cut has another shape than the one the
    neighbourhoods take there, or other teacher channels than the student keeps (``kept``, per
    cut), naming the cut (``names``: of boundaries 1.., the cuts then the head)."""
    run = directory / RUN_NAME
    if not run.is_file():
        return
    record = read_json(run)
    stored = [tuple(shape) for shape in record.get("shapes", [])]
    for b, (mine, theirs) in enumerate(zip(shapes, stored)):
        if tuple(mine) != theirs:
            where = "the input" if b == 0 else f"cut {names[b - 1]!r}"
            raise SynthkdError(f"the activation cache {directory} holds {theirs} at {where}, the student's neighbourhoods "
                               f"take {tuple(mine)} there; use another --cache-dir or delete this one")
    stored_kept = record.get("kept_channels", {})
    for name, channels in zip(names, kept or []):
        if stored_kept.get(name) != channels:
            raise SynthkdError(f"the activation cache {directory} holds {channel_list(stored_kept.get(name))} of the "
                               f"teacher's channels at cut {name!r}, the student keeps {channel_list(channels)}; use "
                               "another --cache-dir or delete this one")


def channel_list(channels: list[int] | None) -> str:
    """A short description of a set of teacher channels (None: all of them)."""
    if channels is None:
        return "all"
    shown = ", ".join(map(str, channels[:4])) + (", ..." if len(channels) > 4 else "")
    return f"{len(channels)} ({shown})"


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GB"


class TeacherActivations:
    """(input, target) pairs of every neighbourhood this rank trains, and the rows to train and
    hold out (the held-out images' plain view measures each neighbourhood's local error).

    ``needed``: the neighbourhoods this rank trains. Building a disk cache is collective (every
    rank makes its share of it) unless ``local``, which keeps the activations in memory. ``kept``:
    per cut, the teacher's channels a born student keeps there (None: all), the only ones stored."""

    def __init__(self, teacher: Classifier, split: Split, dataset: Dataset, config: Any, data_fingerprint: str,
                 accelerator: Accelerator, out: Path, needed: list[int], local: bool = False,
                 kept: list[list[int] | None] | None = None) -> None:
        self.teacher, self.split, self.config = teacher, split, config
        self.kept_channels = list(kept) if kept is not None else [None] * len(split.cuts)
        self._kept_at = [None, *self.kept_channels, None]  # per boundary: the image and the logits are whole
        self.accelerator = accelerator
        self.per_neighbourhood = isinstance(dataset, ActivationDataset)
        self.views = 1 if self.per_neighbourhood else config.cache_views
        self.num_images = len(dataset)
        holdout = min(config.holdout, self.num_images // 5)
        order = torch.randperm(self.num_images, generator=torch.Generator().manual_seed(config.seed))
        self.holdout_rows = order[:holdout].sort().values
        self._train_images = order[holdout:].sort().values
        if self.per_neighbourhood:
            self._pairs = {k: self._per_neighbourhood_pair(dataset, k) for k in needed}
            self.summary = {"where": "activation set", "views": 1}
            return
        fmt = teacher.input_format
        probe = fmt.normalize(torch.zeros(1, *fmt.shape)).to(self._device)
        whole_shapes = [tuple(probe.shape[1:])] + activation_shapes(split, probe)
        shapes = [self._stored_shape(b, shape) for b, shape in enumerate(whole_shapes)]
        size = cache_bytes(shapes, self.num_images, self.views, config.cache_dtype)
        where = self._where(size, local)
        directory = cache_directory(config, out)
        self.summary = {"where": where, "bytes": size, "views": self.views, "dtype": config.cache_dtype,
                        **({"directory": str(directory)} if where == "disk" else {})}
        logger.info(f"teacher activations: {self.num_images} images x {self.views} view(s) x {len(shapes)} boundaries, "
                    f"{human(size)} ({config.cache_dtype}) in {where}" + (f" at {directory}" if where == "disk" else ""))
        boundaries = boundaries_of(needed)
        if where == "memory":
            stored = self._compute_in_memory(dataset, boundaries, shapes)
        else:
            stored = self._from_disk(dataset, directory, shapes, size, data_fingerprint, needed)
        self._pairs = {k: (stored[k], stored[k + 1]) for k in needed}

    @property
    def _device(self) -> torch.device:
        return next(self.teacher.parameters()).device

    @property
    def train_rows(self) -> torch.Tensor:
        """Every view of every image not held out."""
        return (torch.arange(self.views)[:, None] * self.num_images + self._train_images[None]).flatten()

    def _stored_shape(self, b: int, shape: tuple[int, ...]) -> tuple[int, ...]:
        channels = self._kept_at[b]
        return shape if channels is None else (len(channels), *shape[1:])

    def _stored(self, b: int, activations: torch.Tensor) -> torch.Tensor:
        """Boundary ``b`` as the cache stores it: the kept channels only."""
        channels = self._kept_at[b]
        return activations if channels is None else activations[:, channels]

    def pair(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and teacher targets of neighbourhood ``k``, every row (see :attr:`train_rows`)."""
        return self._pairs[k]

    def _where(self, size: int, local: bool) -> str:
        """memory or disk, the same on every rank (collectives follow)."""
        choice = self.config.cache
        if local:
            if choice == "disk":
                raise SynthkdError("a disk activation cache is built by every rank together; this caller trains "
                                   "neighbourhoods alone, so use cache memory or pass the activations in")
            return "memory"
        decision = [cache_location(choice, size)]
        if choice == "auto":
            broadcast_object_list(decision)
        return decision[0]

    def _views(self, images: torch.Tensor, view: int, shard: int) -> torch.Tensor:
        """View ``view`` of a shard's images: as made (view 0), else a seeded augmentation."""
        if view == 0:
            return images
        fmt = self.teacher.input_format
        torch.manual_seed(derive_seed(self.config.seed, "view", view, "shard", shard))
        return distillation_augmentation(fmt.height, fmt.width, self.config.flip, self.config.mixup).to(images.device)(images)

    @torch.no_grad()
    def _image_boundary(self, images: torch.Tensor, view: int, shard: int) -> torch.Tensor:
        """Boundary 0 of one shard's view: the normalised image."""
        fmt = self.teacher.input_format
        return fmt.normalize(fmt.adapt(self._views(images.to(self._device), view, shard)))

    @torch.no_grad()
    def _next_boundary(self, b: int, previous: torch.Tensor) -> torch.Tensor:
        """Boundary ``b`` from boundary b-1 as the cache stores it (on a float32 copy: a piece may
        start with an in-place op that would overwrite the previous boundary)."""
        stored = previous.to(self._device, DTYPES[self.config.cache_dtype])
        return self.split.pieces[b - 1](stored.to(torch.float32, copy=True))

    def _boundaries(self, images: torch.Tensor, view: int, shard: int, depth: int) -> list[torch.Tensor]:
        """Boundaries 0..depth of one shard's view."""
        found = [self._image_boundary(images, view, shard)]
        for b in range(1, depth + 1):
            found.append(self._next_boundary(b, found[-1]))
        return found

    def _shard_images(self, dataset: Dataset, shard: int) -> torch.Tensor:
        start = shard * SHARD_SIZE
        subset = Subset(dataset, range(start, min(self.num_images, start + SHARD_SIZE)))
        return next(iter(DataLoader(subset, batch_size=SHARD_SIZE))).images

    def _shards(self, dataset: Dataset):
        for shard, start in enumerate(range(0, self.num_images, SHARD_SIZE)):
            yield shard, start, self._shard_images(dataset, shard)

    def _compute_in_memory(self, dataset: Dataset, boundaries: list[int], shapes: list[tuple[int, ...]]) -> dict[int, torch.Tensor]:
        dtype = DTYPES[self.config.cache_dtype]
        rows = self.views * self.num_images
        stored = {b: torch.empty(rows, *shapes[b], dtype=dtype) for b in boundaries}
        if not boundaries:
            return stored
        for shard, start, images in self._shards(dataset):
            for view in range(self.views):
                found = self._boundaries(images, view, shard, max(boundaries))
                offset = view * self.num_images + start
                for b in boundaries:
                    stored[b][offset : offset + len(images)] = self._stored(b, found[b]).cpu().to(dtype)
        return stored

    def _from_disk(self, dataset: Dataset, directory: Path, shapes: list[tuple[int, ...]], size: int,
                   data_fingerprint: str, needed: list[int]) -> dict[int, torch.Tensor]:
        """Build (collectively) or reuse the disk cache, split by rank: this rank makes the
        boundaries it is the builder of, in (shard, view, boundary) order on every rank, so a
        boundary made from another rank's one never waits for a shard that waits on it."""
        require_cache_fits(directory, shapes, self.split.names, self.kept_channels)
        if not (directory / MANIFEST_NAME).is_file():
            require_free_disk(directory, size)
        config = self.config
        record = {"teacher": self.teacher.fingerprint(), "data": data_fingerprint, "cuts": list(self.split.cuts),
                  "augmentation": {"flip": config.flip, "mixup": config.mixup, "seed": config.seed} if self.views > 1 else None}
        if any(channels is not None for channels in self.kept_channels):
            record["kept_channels"] = {cut: channels for cut, channels in zip(self.split.cuts, self.kept_channels) if channels}
        builders = boundary_builders(gather_object([needed]), len(shapes))
        writer = ActivationCacheWriter(directory, record, shapes, self.num_images, SHARD_SIZE, self.views,
                                       config.cache_dtype, builders, self.accelerator)
        pending = writer.pending()
        sliced = [channels is not None for channels in self._kept_at]
        for shard in range(writer.num_shards):
            for view in range(self.views):
                made = pending.get((view, shard), [])
                whole: dict[int, torch.Tensor] = {}  # this unit's boundaries with every teacher channel
                for b in computed_boundaries(made, sliced):
                    if b == 0:
                        whole[b] = self._image_boundary(self._shard_images(dataset, shard), view, shard)
                    else:
                        previous = whole[b - 1] if b - 1 in whole else writer.read(b - 1, view, shard)
                        whole[b] = self._next_boundary(b, previous)
                    if b in made:
                        writer.write(b, view, shard, self._stored(b, whole[b]))
        writer.finalize()
        cache = ActivationCache(directory)
        return {b: cache.boundary(b) for b in boundaries_of(needed)}

    @torch.no_grad()
    def _per_neighbourhood_pair(self, dataset: ActivationDataset, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An activation set's own inputs of neighbourhood k and the teacher piece's outputs on them."""
        inputs = dataset.inputs[k]
        piece = self.split.pieces[k]
        targets = torch.cat([piece(inputs[i : i + SHARD_SIZE].to(self._device).clone()).cpu()
                             for i in range(0, len(inputs), SHARD_SIZE)])
        return self._stored(k, inputs), self._stored(k + 1, targets)
