"""Batch augmentations as kornia modules: differentiable, on the device, per-sample random."""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn


def training_augmentation(height: int, width: int, flip: bool = True) -> nn.Module:
    """Pad-and-crop plus horizontal flip, the standard recipe for small-image classifiers."""
    padding = max(1, round(min(height, width) / 8))
    layers: list[nn.Module] = [K.RandomCrop((height, width), padding=padding, padding_mode="reflect")]
    if flip:
        layers.append(K.RandomHorizontalFlip())
    return nn.Sequential(*layers)


class MixUp(nn.Module):
    """Blend each image with another of the batch. For distillation the teacher labels the blend,
    so no label mixing is needed, and a small synthetic set yields many new inputs."""

    def __init__(self, alpha: float = 1.0, p: float = 0.5):
        super().__init__()
        self.alpha = alpha
        self.p = p

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.training or self.alpha <= 0 or len(images) < 2:
            return images
        n = len(images)
        weights = torch.distributions.Beta(self.alpha, self.alpha).sample((n,)).to(images.device)
        weights = torch.where(torch.rand(n, device=images.device) < self.p, weights, torch.ones_like(weights))
        weights = weights.view(n, 1, 1, 1).to(images.dtype)
        partner = images[torch.randperm(n, device=images.device)]
        return weights * images + (1 - weights) * partner


def distillation_augmentation(height: int, width: int, flip: bool, mixup: float) -> nn.Module:
    """The views a student is distilled on: pad-and-crop, flips and (when ``mixup`` > 0) MixUp
    on half the batch; the teacher labels whatever comes out."""
    return nn.Sequential(training_augmentation(height, width, flip), MixUp(alpha=mixup, p=0.5 if mixup > 0 else 0.0))
