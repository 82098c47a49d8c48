"""Activation inversion (DeepInversion, with the Adaptive DeepInversion competition term).

A batch of images is optimised so that the activations entering every BatchNorm layer of the
teacher have the layer's running mean and variance, the teacher predicts the target classes,
and the images stay smooth (total variation) and moderate (l2). Random jitter, flips and
crops are applied with kornia at each step so the images do not overfit one view.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterator, TypeVar

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

from synthkd.accelerator import training_memory_format
from synthkd.errors import SynthkdError
from synthkd.losses import BatchNormStatisticsLoss, image_l2, jensen_shannon, soft_cross_entropy, total_variation
from synthkd.models import Classifier
from synthkd.settings import Settings, setting

from .base import SyntheticImageGenerator, read_generator_state, write_generator_state
from .boundary import BoundarySettings, BoundaryTerms
from .registry import GENERATORS, GeneratorEntry

T = TypeVar("T")
Loss = TypeVar("Loss", bound="InversionLossSettings")


COMPETITION_HELP = ("Adaptive DeepInversion: weight of the term that seeks inputs where the competitor (generate "
                    "--student, or the student distill --synthesize trains) disagrees with the teacher; default: 1 "
                    "with a competitor, 0 without.")


def competition_weight_setting() -> Any:
    """The competition weight's field, shared by every settings class that offers it."""
    return setting(None, help=COMPETITION_HELP, at_least=0)


@dataclass
class InversionLossSettings(Settings):
    """Weights of the inversion objective and the views it is measured on (shared by every
    generator that inverts the teacher: pixels directly, or a generator network)."""

    bn_weight: float = setting(1.0, help="BatchNorm-statistics loss weight.", at_least=0)
    first_bn_weight: float = setting(10.0, help="Extra weight of the first BN layer.", at_least=0)
    ce_weight: float = setting(1.0, help="Cross-entropy to the target classes.", at_least=0)
    tv_weight: float = setting(1.0, help="Total-variation prior.", at_least=0)
    l2_weight: float = setting(0.0, help="l2 image prior.", at_least=0)
    competition_weight: float | None = competition_weight_setting()
    jitter: float = setting(0.1, help="Random shift per step, fraction of the size.", at_least=0, at_most=1)
    flip: bool = setting(True, help="Random horizontal flips per step.")
    crop_scale: float = setting(0.8, help="Smallest area of the random crop (1: none).", above=0, at_most=1)

    def with_competitor(self: Loss, present: bool) -> Loss:
        """These settings with the competition weight decided: unset means 1 with a competitor and
        0 without (the one place that rule lives)."""
        if self.competition_weight is not None:
            return self
        return replace(self, competition_weight=1.0 if present else 0.0)


@dataclass
class InversionSettings(InversionLossSettings):
    """Plain inversion: the objective plus how long and how fast the pixels are optimised."""

    iterations: int = setting(100, help="Optimisation steps per batch.", positive=True)
    lr: float = setting(0.25, help="Adam learning rate on [0,1] pixels.", positive=True)


def part_of(cls: type[T], settings: Any) -> T:
    """The fields of ``cls`` taken from ``settings`` (which has them all, e.g. the generate settings)."""
    return cls(**{spec.name: getattr(settings, spec.name) for spec in fields(cls)})


def inversion_augmentation(config: InversionLossSettings, height: int, width: int) -> nn.Module:
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
    under torch.distributed), cross-entropy to the targets (or to soft targets from :meth:`aim`),
    TV/l2 priors, the competition term and the boundary techniques' terms
    (:class:`~.boundary.BoundaryTerms`), all measured on random kornia views. Use :meth:`hooked`
    around the steps of a batch and :meth:`end_batch` after them."""

    def __init__(self, teacher: Classifier, config: InversionLossSettings, student: Classifier | None = None,
                 bn_momentum: float = 0.0, boundary: BoundarySettings | None = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.settings = config = config.with_competitor(student is not None)
        self.student = student
        self.boundary = BoundaryTerms(boundary or BoundarySettings(), self.teacher, student)
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

    def config(self) -> dict[str, Any]:
        """What a set records of the objective (the boundary techniques only when some are on, so
        sets made before they existed still resume)."""
        recorded = asdict(self.settings)
        if self.boundary.settings.active:
            recorded["boundary"] = self.boundary.settings.record()
        return recorded

    def aim(self, targets: torch.Tensor, seed: int) -> torch.Tensor:
        """The targets a batch is optimised towards (soft rows where ``interpolate`` is on)."""
        return self.boundary.aim(targets, seed)

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
            with self.boundary.hooked():
                yield self
        finally:
            self.statistics.remove()
            self.statistics = None
            if student_state is not None:
                self.student.train(student_state[0])
                for parameter, flag in zip(self.student.parameters(), student_state[1]):
                    parameter.requires_grad_(flag)

    def end_batch(self) -> None:
        """Blend the last step's statistics into the momentum history (Fast-DFKD) and feed the
        boundary techniques' memory bank."""
        self.statistics.update_history()
        self.history = self.statistics.history
        self.boundary.end_batch()

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The objective of one step (an empty batch still joins the all-reduce). ``targets``:
        class indices, or soft targets (rows of class probabilities, from :meth:`aim`)."""
        cfg = self.settings
        views = self.augment(images) if len(images) else images
        logits = self.teacher(views)
        loss = cfg.bn_weight * self.statistics.loss()
        if len(images):
            ce = soft_cross_entropy(logits, targets) if targets.is_floating_point() else F.cross_entropy(logits, targets)
            loss = loss + cfg.ce_weight * ce
            loss = loss + cfg.tv_weight * total_variation(images) + cfg.l2_weight * image_l2(images)
            student_logits = None
            if cfg.competition_weight > 0 or self.boundary.needs_student_logits:
                student_logits = self.student(views)
            if cfg.competition_weight > 0:
                loss = loss + cfg.competition_weight * (1.0 - jensen_shannon(logits, student_logits))
            loss = loss + self.boundary.loss(logits, student_logits)
        return loss


class ActivationInversion(SyntheticImageGenerator):
    method = "inversion"

    def __init__(self, teacher: Classifier, config: InversionSettings | None = None, student: Classifier | None = None,
                 boundary: BoundarySettings | None = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.objective = InversionLoss(teacher, config or InversionSettings(), student, boundary=boundary)
        self.settings: InversionSettings = self.objective.settings  # the competition weight decided

    def config(self) -> dict[str, Any]:
        return self.objective.config()

    def save_state(self, directory: Path) -> None:
        """Batches are independent, except for the contrastive technique's memory bank."""
        tensors = self.objective.boundary.state_tensors()
        if tensors:
            write_generator_state(directory, tensors, self.config())

    def load_state(self, directory: Path) -> None:
        state = read_generator_state(directory, self.config())
        if state is not None:
            self.objective.boundary.load_state_tensors(state[0])

    def generate(self, targets: torch.Tensor, seed: int) -> torch.Tensor:
        cfg = self.settings
        device = next(self.teacher.parameters()).device
        fmt = self.teacher.input_format
        generator = torch.Generator(device="cpu").manual_seed(seed)
        torch.manual_seed(seed)  # kornia draws its augmentation parameters from the global RNG
        init = (0.5 + 0.2 * torch.randn(len(targets), *fmt.shape, generator=generator)).clamp(0, 1)
        images = init.to(device).contiguous(memory_format=training_memory_format(device)).requires_grad_(True)
        targets = self.objective.aim(targets.to(device), seed)
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
            self.objective.end_batch()
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


GENERATORS.add("inversion", GeneratorEntry(
    build=lambda settings, teacher, competitor, seed: ActivationInversion(
        teacher, part_of(InversionSettings, settings), competitor, getattr(settings, "boundary", None)),
    summary="optimise pixels",
    reads=tuple(spec.name for spec in fields(InversionSettings)),
    techniques=("adversarial", "contrastive", "interpolate"),
))
