"""Activation inversion on the tiny digits teacher: shapes, determinism, and that it inverts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from synthkd.errors import SynthkdError
from synthkd.generators.base import SyntheticImageGenerator
from synthkd.generators.inversion import ActivationInversion, InversionSettings
from synthkd.losses import BatchNormStatisticsLoss
from synthkd.models import Classifier, InputFormat, ModelConfig

# 8x8 digits are too small for sub-pixel jitter/crop resampling and flips change a digit's
# class, so the quality test turns these views off (as the demo does for flips).
NO_VIEWS = dict(flip=False, jitter=0.0, crop_scale=1.0)


def bn_loss(model: Classifier, images: torch.Tensor) -> float:
    statistics = BatchNormStatisticsLoss(model, distributed=False)
    try:
        with torch.no_grad():
            model(images)
        return statistics.loss().item()
    finally:
        statistics.remove()


def test_generate_shapes_range_and_determinism(teacher):
    generator = ActivationInversion(teacher, InversionSettings(iterations=8))
    assert isinstance(generator, SyntheticImageGenerator) and generator.method == "inversion"
    targets = torch.tensor([0, 1, 2, 3, 4, 5])
    images = generator.generate(targets, seed=7)
    assert images.shape == (6, *teacher.input_format.shape) == (6, 1, 8, 8)
    assert images.dtype == torch.float32 and not images.requires_grad
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert images.is_contiguous()
    again = ActivationInversion(teacher, InversionSettings(iterations=8)).generate(targets, seed=7)
    assert torch.equal(images, again)
    other = generator.generate(targets, seed=8)
    assert not torch.equal(images, other)
    # The teacher is left usable: no hooks, no gradients.
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(len(m._forward_pre_hooks) == 0 for m in teacher.modules() if isinstance(m, nn.BatchNorm2d))
    # The recorded settings: the competition weight decided (0: no competitor).
    assert generator.config() == InversionSettings(iterations=8, competition_weight=0.0).to_dict()


def test_generate_uses_the_teachers_input_shape():
    torch.manual_seed(0)
    config = ModelConfig(
        arch="resnet8", arch_kwargs={"width": 0.25, "in_channels": 3, "num_classes": 4},
        input=InputFormat(3, 12, 10), class_names=list("abcd"),
    )
    model = Classifier.from_config(config).eval()
    images = ActivationInversion(model, InversionSettings(iterations=2)).generate(torch.tensor([0, 3]), seed=0)
    assert images.shape == (2, 3, 12, 10)
    empty = ActivationInversion(model, InversionSettings(iterations=2)).generate(torch.zeros(0, dtype=torch.long), seed=0)
    assert empty.shape == (0, 3, 12, 10)


def test_inversion_makes_images_the_teacher_recognises(teacher):
    targets = torch.arange(30) % 10
    seed = 3
    generator = ActivationInversion(teacher, InversionSettings(iterations=50, **NO_VIEWS))
    images = generator.generate(targets, seed=seed)
    with torch.no_grad():
        accuracy = (teacher(images).argmax(1) == targets).float().mean().item()
    # The random start the optimisation begins from (0.5 + 0.2 N(0,1), clamped).
    start = (0.5 + 0.2 * torch.randn(30, 1, 8, 8, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)
    with torch.no_grad():
        start_accuracy = (teacher(start).argmax(1) == targets).float().mean().item()
    assert accuracy >= 0.9, accuracy
    assert start_accuracy < 0.5
    assert bn_loss(teacher, images) < 0.5 * bn_loss(teacher, start)
    # Images are no longer the noise they started from.
    assert (images - start).abs().mean() > 0.05


def test_inversion_with_default_views_lowers_the_bn_loss(teacher):
    targets = torch.arange(20) % 10
    images = ActivationInversion(teacher, InversionSettings(iterations=30)).generate(targets, seed=0)
    start = (0.5 + 0.2 * torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert bn_loss(teacher, images) < 0.75 * bn_loss(teacher, start)


def test_competition_term_uses_the_student(teacher):
    torch.manual_seed(5)
    student = Classifier.from_config(teacher.config).eval()
    targets = torch.arange(10)
    plain = ActivationInversion(teacher, InversionSettings(iterations=5)).generate(targets, seed=1)
    # Unset, the competition weight is 1 with a competitor (and 0 without, as for `plain`).
    generator = ActivationInversion(teacher, InversionSettings(iterations=5), student=student)
    assert generator.config()["competition_weight"] == 1.0
    competing = generator.generate(targets, seed=1)
    assert competing.shape == plain.shape
    assert not torch.equal(plain, competing)
    # Set to 0, a competitor is ignored.
    ignored = ActivationInversion(teacher, InversionSettings(iterations=5, competition_weight=0.0), student=student)
    assert torch.equal(ignored.generate(targets, seed=1), plain)


def test_teacher_without_batchnorm_is_refused():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    model = Classifier(net, ModelConfig(arch="x", input=InputFormat(1, 8, 8), class_names=[str(i) for i in range(10)]))
    with pytest.raises(SynthkdError, match="no BatchNorm2d"):
        ActivationInversion(model, InversionSettings(iterations=1))


def test_competition_without_student_is_refused(teacher):
    with pytest.raises(SynthkdError, match="needs a student"):
        ActivationInversion(teacher, InversionSettings(competition_weight=0.5))
