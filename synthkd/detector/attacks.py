"""Adversarial inputs in pixel space: FGSM and PGD under an L-inf budget epsilon on [0,1] images.

The classifier takes [0,1] images and normalises them itself, so epsilon is in pixel units
(epsilon = 0.1 is a tenth of the pixel range) and every adversarial image stays in [0,1].
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..models import Classifier
from ..registry import Registry

Attack = Callable[..., torch.Tensor]
ATTACKS: Registry[Attack] = Registry("attack")
"""Attacks by name, each ``(model, images, labels, epsilon, *, steps, generator) -> adversarial images``."""


def _gradient_sign(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    images = images.detach().requires_grad_(True)
    loss = F.cross_entropy(model(images).float(), labels)
    (gradient,) = torch.autograd.grad(loss, images)
    return gradient.sign()


@ATTACKS.register("fgsm")
def fgsm(model: Classifier, images: torch.Tensor, labels: torch.Tensor, epsilon: float, *, steps: int = 1,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """One step of size epsilon along the sign of the loss gradient (Goodfellow et al. 2015);
    ``steps`` and ``generator`` are the registry's common arguments, unused by this one-step attack."""
    return (images + epsilon * _gradient_sign(model, images, labels)).clamp(0, 1).detach()


@ATTACKS.register("pgd")
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
    """Adversarial versions of a batch by the attack ``name``; ``model`` must be in eval mode
    (BatchNorm statistics fixed)."""
    return ATTACKS.get(name)(model, images, labels, epsilon, steps=pgd_steps, generator=generator)
