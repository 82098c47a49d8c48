"""Activation inversion (DeepInversion, with the Adaptive DeepInversion competition term).

A batch of images is optimised so that the activations entering every BatchNorm layer of the
teacher have the layer's running mean and variance, the teacher predicts the target classes,
and the images stay smooth (total variation) and moderate (l2). Random jitter, flips and
crops are applied with kornia at each step so the images do not overfit one view.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

from synthkd.errors import SynthkdError
from synthkd.losses import BatchNormStatisticsLoss, image_l2, jensen_shannon, total_variation
from synthkd.models import Classifier

from .base import SyntheticImageGenerator


@dataclass
class InversionLossConfig:
    """Weights of the inversion objective and the views it is measured on (shared by every
    generator that inverts the teacher: pixels directly, or a generator network)."""

    bn_weight: float = 1.0
    first_bn_weight: float = 10.0
    ce_weight: float = 1.0
    tv_weight: float = 1.0
    l2_weight: float = 0.0
    competition_weight: float = 0.0
    jitter: float = 0.1  # random shift, as a fraction of the image size
    flip: bool = True
    crop_scale: float = 0.8  # smallest area kept by the random resized crop (1.0: no crop)


@dataclass
class InversionConfig(InversionLossConfig):
    iterations: int = 100
    lr: float = 0.25


def inversion_augmentation(config: InversionLossConfig, height: int, width: int) -> nn.Module:
    """Differentiable per-sample jitter, flip and crop applied at every inversion step."""
    layers: list[nn.Module] = []
    if config.jitter > 0:
        layers.append(K.RandomAffine(degrees=0.0, translate=(config.jitter, config.jitter), padding_mode="reflection"))
    if config.flip:
        layers.append(K.RandomHorizontalFlip())
    if config.crop_scale < 1.0:
        layers.append(K.RandomResizedCrop((height, width), scale=(config.crop_scale, 1.0)))
    return nn.Sequential(*layers)


class InversionLoss:
    """The inversion objective of one step on a batch of [0,1] images: BN statistics (global
    under torch.distributed), cross-entropy to the targets, TV/l2 priors, and the competition
    term, all measured on random kornia views. Use :meth:`hooked` around the steps of a batch."""

    def __init__(self, teacher: Classifier, config: InversionLossConfig, student: Classifier | None = None,
                 bn_momentum: float = 0.0):
        self.teacher = teacher.eval().requires_grad_(False)
        self.settings = config
        self.student = student
        if config.competition_weight > 0 and student is None:
            raise SynthkdError("the competition term needs a student: pass --student MODEL_DIR or set its weight to 0")
        if not any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules()):
            raise SynthkdError(
                "the teacher has no BatchNorm2d layer, so activation inversion has no statistics to match; "
                "use --method diffusion instead"
            )
        fmt = teacher.input_format
        self.augment = inversion_augmentation(config, fmt.height, fmt.width)
        self.bn_momentum = bn_momentum
        self.statistics: BatchNormStatisticsLoss | None = None
        self.history: list[torch.Tensor] | None = None  # BN statistics of past batches (bn_momentum > 0)

    @contextmanager
    def hooked(self) -> Iterator["InversionLoss"]:
        """Statistics hooks on the teacher (and a student that trains between batches held
        still) for the steps of one batch; the hooks are removed afterwards whatever happens."""
        self.statistics = BatchNormStatisticsLoss(self.teacher, self.settings.first_bn_weight, momentum=self.bn_momentum)
        self.statistics.history = self.history
        student_state = None
        if self.student is not None:
            student_state = (self.student.training, [p.requires_grad for p in self.student.parameters()])
            self.student.eval().requires_grad_(False)
        try:
            yield self
        finally:
            self.statistics.remove()
            self.statistics = None
            if student_state is not None:
                self.student.train(student_state[0])
                for parameter, flag in zip(self.student.parameters(), student_state[1]):
                    parameter.requires_grad_(flag)

    def end_batch(self) -> None:
        """Blend the last step's statistics into the momentum history (Fast-DFKD)."""
        self.statistics.update_history()
        self.history = self.statistics.history

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The objective of one step (an empty batch still joins the all-reduce)."""
        cfg = self.settings
        views = self.augment(images) if len(images) else images
        logits = self.teacher(views)
        loss = cfg.bn_weight * self.statistics.loss()
        if len(images):
            loss = loss + cfg.ce_weight * F.cross_entropy(logits, targets)
            loss = loss + cfg.tv_weight * total_variation(images) + cfg.l2_weight * image_l2(images)
            if cfg.competition_weight > 0:
                disagreement = jensen_shannon(logits, self.student(views))
                loss = loss + cfg.competition_weight * (1.0 - disagreement)
        return loss


class ActivationInversion(SyntheticImageGenerator):
    method = "inversion"

    def __init__(self, teacher: Classifier, config: InversionConfig | None = None, student: Classifier | None = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.settings = config or InversionConfig()
        self.objective = InversionLoss(teacher, self.settings, student)

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
        best_loss, best_images = math.inf, images.detach().clone()
        with self.objective.hooked():
            for step in range(cfg.iterations):
                for group in optimizer.param_groups:
                    group["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / cfg.iterations))
                before = images.detach().clone()
                loss = self.step(images, targets, optimizer)
                if loss < best_loss:  # the loss was measured on the images before the step
                    best_loss, best_images = loss, before
        return best_images.contiguous()

    def step(self, images: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
        """One optimisation step on ``images`` in place (inside ``objective.hooked()``);
        returns the loss before the step."""
        loss = self.objective(images, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            images.clamp_(0, 1)
        return loss.item()
