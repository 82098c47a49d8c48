"""Datasets of other libraries whose items are PIL images and class ids (torchvision datasets,
Hugging Face ``datasets``), read on access as the typed items every stage takes."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import SynthkdError, one_line
from .batches import LabelledBatch


@contextmanager
def decoding(what: Any) -> Iterator[None]:
    """Opening or decoding images inside: PIL's decompression-bomb warning is held back, and its
    error (a header claiming billions of pixels) is one line naming ``what``."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            yield
        except Image.DecompressionBombError as error:
            raise SynthkdError(f"{what} claims more pixels than an image may have ({one_line(error)}); "
                               "remove it or give it at a real size") from error


def pil_to_tensor(image: Any, mode: str, size: tuple[int, int]) -> torch.Tensor:
    """A PIL image as a float C x H x W tensor in [0,1], converted to ``mode`` and resized to
    ``size`` (height, width) where it differs."""
    from PIL import Image

    image = image.convert(mode)
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    pixels = pixels.unsqueeze(0) if mode == "L" else pixels.permute(2, 0, 1)
    return pixels.float().div_(255)


class PILDataset(Dataset):
    """Items ``read(i) -> (PIL image, class id)`` of ``length`` items, decoded on access. Every
    image takes the first one's mode (grey or RGB) and size, so batches stack."""

    def __init__(self, read: Callable[[int], tuple[Any, int]], length: int, class_names: Sequence[str], name: str,
                 indices: Sequence[int] | None = None, mode: str | None = None, size: tuple[int, int] | None = None):
        """``mode`` ("L" or "RGB") and ``size`` (height, width): what every image becomes, by
        default the first one's."""
        self.read, self.length, self.class_names, self.name = read, length, list(class_names), name
        self.indices = range(length) if indices is None else indices
        first = None
        if (mode is None or size is None) and len(self.indices):
            first, _ = self._read(self.indices[0])
        self.mode = mode or ("L" if first is not None and first.mode in ("L", "1", "I", "I;16", "F") else "RGB")
        self.size = size or ((first.height, first.width) if first is not None else (1, 1))

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, item: int) -> tuple[Any, int]:
        with decoding(f"item {item} of {self.name}"):
            return self.read(item)

    def __getitem__(self, index: int) -> LabelledBatch:
        image, label = self._read(self.indices[index])
        return LabelledBatch(pil_to_tensor(image, self.mode, self.size), int(label))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1 if self.mode == "L" else 3, *self.size)

    def subset(self, index: slice) -> "PILDataset":
        return PILDataset(self.read, self.length, self.class_names, self.name, self.indices[index], self.mode, self.size)

    def channel_stats(self, max_images: int = 2000) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of [0,1] pixels over (at most) the first ``max_images``."""
        images = torch.stack([self[i].images for i in range(min(len(self), max_images))])
        return images.mean((0, 2, 3)).tolist(), images.std((0, 2, 3)).tolist()
