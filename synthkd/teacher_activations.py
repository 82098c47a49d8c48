"""The teacher's activation at every cut on a training set, computed once for all neighbourhoods.

Boundary 0 is the normalised image, boundary k the teacher's output at cut k, the last one its
logits; neighbourhood k learns boundary k -> k+1. Every image comes in ``cache_views`` views (the
image as made, then augmented ones seeded by view and shard), so the teacher never runs again
during training. Kept in memory when it fits, else in a disk cache
(:mod:`synthkd.data.activation_cache`) whose size is announced, checked against the free disk
before anything is written, and which resumes after a kill. Rows are view-major:
``view * num_images + image``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader, Dataset, Subset

from .accelerator import logger
from .augment import distillation_augmentation
from .data.activation_cache import DTYPES, ActivationCache, ActivationCacheWriter, cache_bytes
from .data.activations import ActivationDataset
from .data.format import MANIFEST_NAME
from .errors import SynthkdError
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
    rank makes its share of it) unless ``local``, which keeps the activations in memory."""

    def __init__(self, teacher: Classifier, split: Split, dataset: Dataset, config: Any, data_fingerprint: str,
                 accelerator: Accelerator, out: Path, needed: list[int], local: bool = False) -> None:
        self.teacher, self.split, self.config = teacher, split, config
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
        shapes = [tuple(probe.shape[1:])] + activation_shapes(split, probe)
        size = cache_bytes(shapes, self.num_images, self.views, config.cache_dtype)
        where = self._where(size, local)
        directory = Path(config.cache_dir) if config.cache_dir else Path(out) / "activation-cache"
        self.summary = {"where": where, "bytes": size, "views": self.views, "dtype": config.cache_dtype,
                        **({"directory": str(directory)} if where == "disk" else {})}
        logger.info(f"teacher activations: {self.num_images} images x {self.views} view(s) x {len(shapes)} boundaries, "
                    f"{human(size)} ({config.cache_dtype}) in {where}" + (f" at {directory}" if where == "disk" else ""))
        boundaries = sorted({b for k in needed for b in (k, k + 1)})
        if where == "memory":
            stored = self._compute_in_memory(dataset, boundaries, shapes)
        else:
            stored = self._from_disk(dataset, directory, shapes, size, data_fingerprint, boundaries)
        self._pairs = {k: (stored[k], stored[k + 1]) for k in needed}

    @property
    def _device(self) -> torch.device:
        return next(self.teacher.parameters()).device

    @property
    def train_rows(self) -> torch.Tensor:
        """Every view of every image not held out."""
        return (torch.arange(self.views)[:, None] * self.num_images + self._train_images[None]).flatten()

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
        if choice == "auto":
            decision = ["memory" if size <= MEMORY_FRACTION * available_memory() else "disk"]
            broadcast_object_list(decision)
            return decision[0]
        return choice

    def _views(self, images: torch.Tensor, view: int, shard: int) -> torch.Tensor:
        """View ``view`` of a shard's images: as made (view 0), else a seeded augmentation."""
        if view == 0:
            return images
        fmt = self.teacher.input_format
        torch.manual_seed(derive_seed(self.config.seed, "view", view, "shard", shard))
        return distillation_augmentation(fmt.height, fmt.width, self.config.flip, self.config.mixup).to(images.device)(images)

    @torch.no_grad()
    def _boundaries(self, images: torch.Tensor, view: int, shard: int, depth: int) -> list[torch.Tensor]:
        """Boundaries 0..depth of one shard's view (each piece on a clone: a piece may start
        with an in-place op that would overwrite the previous boundary)."""
        fmt = self.teacher.input_format
        images = self._views(images.to(self._device), view, shard)
        found = [fmt.normalize(fmt.adapt(images))]
        for piece in self.split.pieces[:depth]:
            found.append(piece(found[-1].clone()))
        return found

    def _shards(self, dataset: Dataset):
        for shard, start in enumerate(range(0, self.num_images, SHARD_SIZE)):
            subset = Subset(dataset, range(start, min(self.num_images, start + SHARD_SIZE)))
            yield shard, start, next(iter(DataLoader(subset, batch_size=SHARD_SIZE))).images

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
                    stored[b][offset : offset + len(images)] = found[b].cpu().to(dtype)
        return stored

    def _from_disk(self, dataset: Dataset, directory: Path, shapes: list[tuple[int, ...]], size: int,
                   data_fingerprint: str, boundaries: list[int]) -> dict[int, torch.Tensor]:
        if not (directory / MANIFEST_NAME).is_file() and size > free_disk(directory):
            raise SynthkdError(
                f"the activation cache needs {human(size)} but {directory} has {human(free_disk(directory))} free; "
                "use --cache-dtype float16, fewer --cache-views, another --cache-dir or --cache memory (nothing was written)")
        config = self.config
        record = {"teacher": self.teacher.fingerprint(), "data": data_fingerprint, "cuts": list(self.split.cuts),
                  "augmentation": {"flip": config.flip, "mixup": config.mixup, "seed": config.seed} if self.views > 1 else None}
        writer = ActivationCacheWriter(directory, record, shapes, self.num_images, SHARD_SIZE, self.views,
                                       config.cache_dtype, self.accelerator)
        pending = writer.pending()
        if pending:
            for shard, _, images in self._shards(dataset):
                for view in range(self.views):
                    missing = pending.get((view, shard))
                    if missing:
                        found = self._boundaries(images, view, shard, max(missing))
                        for b in missing:
                            writer.write(b, view, shard, found[b])
        writer.finalize()
        cache = ActivationCache(directory)
        return {b: cache.boundary(b) for b in boundaries}

    @torch.no_grad()
    def _per_neighbourhood_pair(self, dataset: ActivationDataset, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An activation set's own inputs of neighbourhood k and the teacher piece's outputs on them."""
        inputs = dataset.inputs[k]
        piece = self.split.pieces[k]
        targets = torch.cat([piece(inputs[i : i + SHARD_SIZE].to(self._device).clone()).cpu()
                             for i in range(0, len(inputs), SHARD_SIZE)])
        return inputs, targets
