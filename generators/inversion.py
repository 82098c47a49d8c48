"""Activation inversion (DeepInversion, with the Adaptive DeepInversion competition term).

A batch of images is optimised so that the activations entering every BatchNorm layer of the
teacher have the layer's running mean and variance, the teacher predicts the target classes,
and the images stay smooth (total variation) and moderate (l2). Random jitter, flips and
crops are applied with kornia at each step so the images do not overfit one view.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

from synthkd.errors import SynthkdError
from synthkd.losses import BatchNormStatisticsLoss, image_l2, jensen_shannon, total_variation
from synthkd.models import Classifier

from .base import SyntheticImageGenerator


@dataclass
class InversionConfig:
    iterations: int = 100
    lr: float = 0.25
    bn_weight: float = 1.0
    first_bn_weight: float = 10.0
    ce_weight: float = 1.0
    tv_weight: float = 1.0
    l2_weight: float = 0.0
    competition_weight: float = 0.0
    jitter: float = 0.1  # random shift, as a fraction of the image size
    flip: bool = True
    crop_scale: float = 0.8  # smallest area kept by the random resized crop (1.0: no crop)


def inversion_augmentation(config: InversionConfig, height: int, width: int) -> nn.Module:
    """Differentiable per-sample jitter, flip and crop applied at every inversion step."""
    layers: list[nn.Module] = []
    if config.jitter > 0:
        layers.append(K.RandomAffine(degrees=0.0, translate=(config.jitter, config.jitter), padding_mode="reflection"))
    if config.flip:
        layers.append(K.RandomHorizontalFlip())
    if config.crop_scale < 1.0:
        layers.append(K.RandomResizedCrop((height, width), scale=(config.crop_scale, 1.0)))
    return nn.Sequential(*layers)


class ActivationInversion(SyntheticImageGenerator):
    method = "inversion"

    def __init__(self, teacher: Classifier, config: InversionConfig | None = None, student: Classifier | None = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.settings = config or InversionConfig()
        self.student = student.eval().requires_grad_(False) if student is not None else None
        if self.settings.competition_weight > 0 and self.student is None:
            raise SynthkdError("the competition term needs a student: pass --student MODEL_DIR or set its weight to 0")
        if not any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules()):
            raise SynthkdError(
                "the teacher has no BatchNorm2d layer, so activation inversion has no statistics to match; "
                "use --method diffusion instead"
            )
        fmt = teacher.input_format
        self.augment = inversion_augmentation(self.settings, fmt.height, fmt.width)

    def config(self) -> dict[str, Any]:
        return asdict(self.settings)

    def generate(self, targets: torch.Tensor, seed: int) -> torch.Tensor:
        cfg = self.settings
        device = next(self.teacher.parameters()).device
        fmt = self.teacher.input_format
        generator = torch.Generator(device="cpu").manual_seed(seed)
        torch.manual_seed(seed)  # kornia draws its augmentation parameters from the global RNG
        init = (0.5 + 0.2 * torch.randn(len(targets), *fmt.shape, generator=generator)).clamp(0, 1)
        images = init.to(device).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        targets = targets.to(device)
        optimizer = torch.optim.Adam([images], lr=cfg.lr, betas=(0.5, 0.9))
        statistics = BatchNormStatisticsLoss(self.teacher, first_layer_weight=cfg.first_bn_weight)
        best_loss, best_images = math.inf, images.detach().clone()
        try:
            for step in range(cfg.iterations):
                for group in optimizer.param_groups:
                    group["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / cfg.iterations))
                before = images.detach().clone()
                loss = self.step(images, targets, optimizer, statistics)
                if loss < best_loss:  # the loss was measured on the images before the step
                    best_loss, best_images = loss, before
        finally:
            statistics.remove()
        return best_images.contiguous()

    def step(
        self, images: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer,
        statistics: BatchNormStatisticsLoss,
    ) -> float:
        """One optimisation step on ``images`` in place; returns the loss before the step."""
        loss = self.loss(images, targets, statistics)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            images.clamp_(0, 1)
        return loss.item()

    def loss(self, images: torch.Tensor, targets: torch.Tensor, statistics: BatchNormStatisticsLoss) -> torch.Tensor:
        """The inversion objective of one step (BN statistics are global under torch.distributed)."""
        cfg = self.settings
        views = self.augment(images) if len(images) else images
        logits = self.teacher(views)
        loss = cfg.bn_weight * statistics.loss()
        if len(images):
            loss = loss + cfg.ce_weight * F.cross_entropy(logits, targets)
            loss = loss + cfg.tv_weight * total_variation(images) + cfg.l2_weight * image_l2(images)
            if cfg.competition_weight > 0:
                disagreement = jensen_shannon(logits, self.student(views))
                loss = loss + cfg.competition_weight * (1.0 - disagreement)
        return loss
