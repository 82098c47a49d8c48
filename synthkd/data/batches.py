"""Typed items and batches: consumers read ``batch.images`` instead of ``batch[0]``.

One NamedTuple serves as an item and, collated by a DataLoader (which keeps NamedTuple types),
as a batch; its fields are named for the batch. Tuple unpacking still works.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.data import Dataset


class LabelledBatch(NamedTuple):
    """Images in [0,1] (C x H x W, or N x C x H x W collated) and class ids (-1: unlabelled)."""

    images: torch.Tensor
    targets: torch.Tensor | int


class SyntheticBatch(NamedTuple):
    """Synthetic images in [0,1], the teacher's logits for them, and the class each was made for."""

    images: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor | int


class LabelledTensors(Dataset):
    """Images and labels held as two tensors (like ``TensorDataset``), read as typed items."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> LabelledBatch:
        return LabelledBatch(self.images[index], self.targets[index])
