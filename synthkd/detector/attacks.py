"""Adversarial inputs in pixel space: FGSM and PGD under an L-inf budget epsilon on [0,1] images.

The classifier takes [0,1] images and normalises them itself, so epsilon is in pixel units
(epsilon = 0.1 is a tenth of the pixel range) and every adversarial image stays in [0,1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import SynthkdError
from ..models import Classifier

ATTACKS = ("fgsm", "pgd")


def _gradient_sign(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    images = images.detach().requires_grad_(True)
    loss = F.cross_entropy(model(images).float(), labels)
    (gradient,) = torch.autograd.grad(loss, images)
    return gradient.sign()


def fgsm(model: Classifier, images: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    """One step of size epsilon along the sign of the loss gradient (Goodfellow et al. 2015)."""
    return (images + epsilon * _gradient_sign(model, images, labels)).clamp(0, 1).detach()


def pgd(model: Classifier, images: torch.Tensor, labels: torch.Tensor, epsilon: float, steps: int = 10,
        step_size: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent from a random start in the epsilon ball (Madry et al. 2018);
    step size 2.5 * epsilon / steps unless given."""
    step_size = 2.5 * epsilon / steps if step_size is None else step_size
    noise = torch.rand(images.shape, generator=generator).to(images.device) * 2 - 1
    adversarial = (images + epsilon * noise).clamp(0, 1)
    for _ in range(steps):
        adversarial = adversarial + step_size * _gradient_sign(model, adversarial, labels)
        adversarial = torch.min(torch.max(adversarial, images - epsilon), images + epsilon).clamp(0, 1).detach()
    return adversarial


def attack(name: str, model: Classifier, images: torch.Tensor, labels: torch.Tensor, epsilon: float,
           pgd_steps: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial versions of a batch; ``model`` must be in eval mode (BatchNorm statistics fixed)."""
    if epsilon <= 0:
        raise SynthkdError(f"epsilon must be positive (a budget in [0,1] pixel units), got {epsilon}")
    if name == "fgsm":
        return fgsm(model, images, labels, epsilon)
    if name == "pgd":
        return pgd(model, images, labels, epsilon, pgd_steps, generator=generator)
    raise SynthkdError(f"unknown attack {name!r}; use one of {', '.join(ATTACKS)}")
