"""``noise:gaussian[:N]`` / ``noise:uniform[:N]``: the simplest out-of-distribution set."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ...errors import SynthkdError
from ..batches import LabelledBatch
from ..datasets import register_dataset

NOISE_KINDS = ("gaussian", "uniform")


class NoiseDataset(Dataset):
    """Gaussian or uniform noise images, unlabelled (-1)."""

    def __init__(self, kind: str, size: int = 1000, image_shape: tuple[int, int, int] = (1, 28, 28), seed: int = 0):
        if kind not in NOISE_KINDS:
            raise SynthkdError(f"unknown noise kind {kind!r}; use noise:gaussian or noise:uniform")
        generator = torch.Generator().manual_seed(seed)
        if kind == "gaussian":
            images = (0.5 + 0.25 * torch.randn(size, *image_shape, generator=generator)).clamp(0, 1)
        else:
            images = torch.rand(size, *image_shape, generator=generator)
        self.images = images
        self.class_names: list[str] = []
        self.name = f"noise:{kind}"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> LabelledBatch:
        return LabelledBatch(self.images[index], -1)


def noise_args(args: list[str]) -> tuple[str, int]:
    """(kind, size) of ``noise[:KIND[:N]]``; checked before a run reads any image."""
    kind = args[0] if args else "gaussian"
    if kind not in NOISE_KINDS:
        raise SynthkdError(f"unknown noise kind {kind!r}; use noise:gaussian or noise:uniform")
    if len(args) > 1 and not args[1].isdigit():
        raise SynthkdError(f"noise takes a kind and an optional size: noise:gaussian:5000, got noise:{':'.join(args)}")
    return kind, int(args[1]) if len(args) > 1 else 1000


@register_dataset("noise", usage="noise:gaussian|uniform[:N]", check=noise_args,
                  description="N (default 1,000) 1x28x28 noise images")
def noise(args: list[str]) -> NoiseDataset:
    return NoiseDataset(*noise_args(args))
