"""Synthetic inputs for one neighbourhood at a time, with no image at all.

Neighbourhood k of the teacher maps the activation at cut k-1 to the activation at cut k. Its
input activations are optimised directly so that

* the BatchNorm layers inside teacher neighbourhood k see their running mean and variance,
* the output, passed on through neighbourhood k+1, gives *its* BatchNorm layers their running
  statistics too (``lookahead_weight``: the teacher's statistics at the next cut),
* they stay in the range the real activation can take: non-negative where the cut follows a
  ReLU, and the normalised [0,1] pixel range for the first neighbourhood.

A neighbourhood is a few layers, so a step costs a fraction of a whole-network inversion step.
A neighbourhood without BatchNorm (the head: pooling and the classifier) gets the outputs of
the teacher's previous neighbourhood on that neighbourhood's synthetic inputs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from synthkd.errors import SynthkdError
from synthkd.losses import BatchNormStatisticsLoss
from synthkd.models import Classifier, unwrap
from synthkd.models.neighbourhoods import activation_shapes, resolve_cuts, split_network


@dataclass
class ActivationConfig:
    iterations: int = 100
    lr: float = 0.1
    cuts: str | list[str] = "blocks"
    lookahead_weight: float = 1.0


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in module.modules())


class ActivationSynthesizer:
    """Makes the input activations of each neighbourhood of ``teacher`` cut at ``config.cuts``."""

    method = "activations"

    def __init__(self, teacher: Classifier, config: ActivationConfig | None = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.settings = config or ActivationConfig()
        if self.settings.iterations < 1 or self.settings.lr <= 0 or self.settings.lookahead_weight < 0:
            raise SynthkdError("--iterations and --activation-lr must be positive and --lookahead-weight not negative")
        self.cuts = resolve_cuts(unwrap(teacher.net), self.settings.cuts)
        self.split = split_network(teacher.net, self.cuts)
        self.pieces = self.split.pieces
        if not _has_batchnorm(self.pieces[0]):
            raise SynthkdError(
                "the teacher's first neighbourhood has no BatchNorm2d layer, so its inputs have no statistics to "
                "match; cut after a BatchNorm layer or use --method inversion"
            )
        fmt = teacher.input_format
        probe_images = torch.rand(8, *fmt.shape, generator=torch.Generator().manual_seed(0))
        probe = fmt.normalize(probe_images)
        self.input_shapes = [tuple(probe.shape[1:])] + activation_shapes(self.split, probe)[:-1]
        # Range of each neighbourhood's input: the normalised pixel range for the first, >= 0
        # after a ReLU (seen as: never negative on the probe), unbounded otherwise.
        mean = torch.tensor(fmt.mean).view(-1, 1, 1)
        std = torch.tensor(fmt.std).view(-1, 1, 1)
        self.bounds: list[tuple[torch.Tensor | None, torch.Tensor | None]] = [((0 - mean) / std, (1 - mean) / std)]
        x = probe
        with torch.no_grad():
            for piece in self.pieces[:-1]:
                x = piece(x.clone())
                self.bounds.append((torch.zeros(()), None) if bool((x >= 0).all()) else (None, None))
        # The neighbourhood whose statistics make each one's inputs (itself, or the nearest
        # earlier one with BatchNorm, whose inputs are pushed through the teacher).
        self.sources = []
        for k, piece in enumerate(self.pieces):
            self.sources.append(k if _has_batchnorm(piece) else self.sources[k - 1])

    @property
    def names(self) -> list[str]:
        return self.split.names

    def config(self) -> dict[str, Any]:
        return {**asdict(self.settings), "cuts": self.cuts}

    def synthesize(self, k: int, count: int, seed: int) -> torch.Tensor:
        """``count`` inputs for neighbourhood ``k`` (shape (count, *input_shapes[k]))."""
        source = self.sources[k]
        inputs = self.fit(source, count, seed)
        with torch.no_grad():
            for piece in self.pieces[source:k]:
                inputs = piece(inputs.clone())
        return inputs.detach().contiguous()

    def fit(self, k: int, count: int, seed: int) -> torch.Tensor:
        """Optimise inputs of neighbourhood ``k`` (which has BatchNorm) against its statistics."""
        cfg = self.settings
        device = next(self.teacher.parameters()).device
        generator = torch.Generator(device="cpu").manual_seed(seed)
        lower, upper = (b.to(device) if b is not None else None for b in self.bounds[k])
        start = torch.randn(count, *self.input_shapes[k], generator=generator).to(device)
        if upper is not None:  # pixels: the inversion start, mid-grey plus noise
            start = lower + (upper - lower) * (0.5 + 0.2 * start)
        inputs = self._clamp(start, lower, upper).requires_grad_(True)
        here = BatchNormStatisticsLoss(self.pieces[k], first_layer_weight=1.0, distributed=False)
        following = self.pieces[k + 1] if k + 1 < len(self.pieces) and cfg.lookahead_weight > 0 else None
        ahead = BatchNormStatisticsLoss(following, first_layer_weight=1.0, distributed=False) \
            if following is not None and _has_batchnorm(following) else None
        optimizer = torch.optim.Adam([inputs], lr=cfg.lr, betas=(0.5, 0.9))
        best_loss, best = math.inf, inputs.detach().clone()
        try:
            for step in range(cfg.iterations):
                for group in optimizer.param_groups:
                    group["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / cfg.iterations))
                output = self.pieces[k](inputs.clone())  # a piece may begin with an in-place op
                loss = here.loss()
                if ahead is not None:
                    self.pieces[k + 1](output)
                    loss = loss + cfg.lookahead_weight * ahead.loss()
                if loss.item() < best_loss:
                    best_loss, best = loss.item(), inputs.detach().clone()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    inputs.copy_(self._clamp(inputs, lower, upper))
        finally:
            here.remove()
            if ahead is not None:
                ahead.remove()
        return best

    @staticmethod
    def _clamp(x: torch.Tensor, lower: torch.Tensor | None, upper: torch.Tensor | None) -> torch.Tensor:
        if lower is not None:
            x = torch.maximum(x, lower)
        if upper is not None:
            x = torch.minimum(x, upper)
        return x
