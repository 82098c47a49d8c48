"""Loss terms for inversion and distillation, each a small function or module on batches.

The losses a student is distilled with are registered in :data:`DISTILLATION_LOSSES` under a
name, each taking ``(student output, teacher output, temperature)``; a new one is a function
with the decorator, and the trainers pick theirs by name.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .registry import Registry

DistillationLoss = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
DISTILLATION_LOSSES: Registry[DistillationLoss] = Registry("distillation loss")


@DISTILLATION_LOSSES.register("kd")
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton's KD: KL(teacher || student) on temperature-softened outputs, scaled by T^2."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2


@DISTILLATION_LOSSES.register("mse")
def activation_mse(student_activation: torch.Tensor, teacher_activation: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean squared error to the teacher's activation at a cut (a neighbourhood's regression
    target); the temperature, meaningless for activations, is ignored."""
    return F.mse_loss(student_activation, teacher_activation)


def relative_squared_error(output: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(||output - target||^2, ||target||^2): summed over batches, their ratio is the relative
    MSE a neighbourhood or a searched piece is judged by."""
    return (output - target).pow(2).sum().item(), target.pow(2).sum().item()


def total_variation(images: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Mean (p=2: squared, p=1: absolute) difference of neighbouring pixels: a smoothness prior."""
    dx = images[..., :, 1:] - images[..., :, :-1]
    dy = images[..., 1:, :] - images[..., :-1, :]
    if p == 1:
        return dx.abs().mean() + dy.abs().mean()
    return dx.pow(2).mean() + dy.pow(2).mean()


def image_l2(images: torch.Tensor) -> torch.Tensor:
    """Mean squared pixel value per image around mid-grey: keeps inverted pixels from saturating."""
    return (images - 0.5).pow(2).flatten(1).sum(1).mean() / images[0].numel()


def jensen_shannon(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between two classifiers' predictions, averaged over the batch."""
    p = F.softmax(logits_a, dim=1)
    q = F.softmax(logits_b, dim=1)
    m = (0.5 * (p + q)).clamp_min(1e-8).log()
    return 0.5 * (F.kl_div(m, p, reduction="batchmean") + F.kl_div(m, q, reduction="batchmean"))


class BatchNormStatisticsLoss:
    """Feature-statistics loss of DeepInversion, taken with hooks so any model works unchanged.

    A forward pre-hook on every ``BatchNorm2d`` records the per-channel sum and sum of squares
    of its input. :meth:`loss` compares the batch mean/variance with the layer's running
    statistics: sum over layers of ||mean - running_mean||_2 + ||var - running_var||_2, the first
    layer weighted by ``first_layer_weight``. When torch.distributed is initialised the sums are
    all-reduced (one differentiable collective per step), so every rank matches the statistics
    of the global batch rather than of its own shard.

    With ``momentum`` m > 0 (Fast-DFKD), what is compared is the blend (1 - m) * batch + m * past,
    where ``past`` is a running average of earlier batches' statistics (:meth:`update_history`):
    a small batch made in few steps then need not match the statistics alone.
    """

    def __init__(self, model: nn.Module, first_layer_weight: float = 10.0, distributed: bool | None = None,
                 momentum: float = 0.0):
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError("the model has no BatchNorm2d layer, so there are no statistics to invert")
        self.first_layer_weight = first_layer_weight
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.distributed = distributed
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.history: list[torch.Tensor] | None = None  # per layer: cat(mean, var) of past batches
        self._last: list[torch.Tensor] = []
        self._stats: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles = [
            layer.register_forward_pre_hook(self._make_hook(i)) for i, layer in enumerate(self.layers)
        ]

    def _make_hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor]) -> None:
            x = inputs[0].float()
            count = x.new_tensor([x.shape[0] * x.shape[2] * x.shape[3]], dtype=torch.float32)
            self._stats[index] = torch.cat([x.sum((0, 2, 3)), x.pow(2).sum((0, 2, 3)), count])

        return hook

    def loss(self) -> torch.Tensor:
        """The statistics loss of the last forward pass (global batch under torch.distributed)."""
        if any(s is None for s in self._stats):
            raise RuntimeError("run a forward pass through the model before asking for the loss")
        sizes = [s.numel() for s in self._stats]
        stacked = torch.cat(self._stats)
        if self.distributed:
            from torch.distributed.nn.functional import all_reduce

            stacked = all_reduce(stacked)
        total = stacked.new_zeros(())
        last: list[torch.Tensor] = []
        for index, (layer, stats) in enumerate(zip(self.layers, stacked.split(sizes))):
            channels = layer.num_features
            count = stats[-1].clamp_min(1.0)
            mean = stats[:channels] / count
            var = stats[channels : 2 * channels] / count - mean.pow(2)
            last.append(torch.cat([mean, var]).detach())
            if self.momentum > 0 and self.history is not None:
                past_mean, past_var = self.history[index].to(mean.device).split(channels)
                mean = (1 - self.momentum) * mean + self.momentum * past_mean
                var = (1 - self.momentum) * var + self.momentum * past_var
            term = torch.linalg.vector_norm(mean - layer.running_mean) + torch.linalg.vector_norm(
                var - layer.running_var
            )
            total = total + (self.first_layer_weight if index == 0 else 1.0) * term
        self._stats = [None] * len(self.layers)
        self._last = last
        return total

    def update_history(self) -> None:
        """Fold the statistics of the last :meth:`loss` into the running average of past batches."""
        if not self._last:
            raise RuntimeError("compute a loss before updating the history of statistics")
        if self.history is None:
            self.history = [stats.clone() for stats in self._last]
        else:
            self.history = [self.momentum * past + (1 - self.momentum) * stats.to(past.device)
                            for past, stats in zip(self.history, self._last)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------
# Terms that aim synthetic samples at the decision boundaries (generators/boundary.py combines
# them; each is minimised by the generator)


def soft_cross_entropy(logits: torch.Tensor, target_probabilities: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to a distribution over classes per sample (a class pair's blend, for
    samples aimed between two classes), averaged over the batch; one-hot rows give plain CE."""
    return -(target_probabilities * F.log_softmax(logits, dim=1)).sum(1).mean()


def agreement_masked_adversarial(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Minus the KD divergence KL(teacher || student) (the loss the student minimises), summed over
    the samples whose top class the two agree on and divided by the batch size (CMI, Fast-DFKD):
    the generator moves samples the student already gets right to where it disagrees with the
    teacher, and leaves alone those it already gets wrong (pushing them further only makes them
    unlike anything the teacher knows)."""
    agree = (teacher_logits.argmax(1) == student_logits.argmax(1)).float()
    log_teacher = F.log_softmax(teacher_logits, dim=1)
    divergence = (log_teacher.exp() * (log_teacher - F.log_softmax(student_logits, dim=1))).sum(1)
    return -(divergence * agree).sum() / max(1, len(teacher_logits))


def instance_discrimination(features: torch.Tensor, bank: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """InfoNCE of each sample against every other sample of the batch and every feature of the
    bank (CMI's contrastive diversity, without a learned head): each unit-length feature's
    positive is itself, so minimising it spreads the batch away from itself and from the samples
    made before. ``bank``: unit-length features of earlier batches (M x D) or None."""
    unit = F.normalize(features.float(), dim=1)
    keys = unit if bank is None or len(bank) == 0 else torch.cat([unit, bank.to(unit.device, unit.dtype)])
    similarity = unit @ keys.T / temperature
    return F.cross_entropy(similarity, torch.arange(len(unit), device=unit.device))
