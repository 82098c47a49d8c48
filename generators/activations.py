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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from synthkd.errors import SynthkdError
from synthkd.losses import BatchNormStatisticsLoss
from synthkd.models import Classifier, unwrap
from synthkd.models.neighbourhoods import activation_shapes, resolve_cuts, split_network
from synthkd.settings import Settings, setting

from .registry import GENERATORS, GeneratorEntry


@dataclass
class ActivationSettings(Settings):
    """Per-neighbourhood input activations (``generate --method activations``); the optimisation
    steps are the generate settings' ``iterations``."""

    cuts: str = setting("blocks", help="Where the teacher is cut into neighbourhoods (blocks, stages or comma-separated "
                                       "module paths), as for distill --cuts; --method activations makes each one's inputs.")
    activation_lr: float = setting(0.1, positive=True, help="--method activations: Adam learning rate on the activations.")
    lookahead_weight: float = setting(1.0, at_least=0, help="--method activations: weight of the next neighbourhood's "
                                                            "BN statistics on the output.")


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in module.modules())


class ActivationSynthesizer:
    """Makes the input activations of each neighbourhood of ``teacher`` cut at ``config.cuts``."""

    method = "activations"

    def __init__(self, teacher: Classifier, config: ActivationSettings | None = None, iterations: int = 100):
        self.teacher = teacher.eval().requires_grad_(False)
        self.settings = config or ActivationSettings()
        self.settings.check()
        if iterations < 1:
            raise SynthkdError(f"iterations must be positive, got {iterations}")
        self.iterations = iterations
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
        """Named as in the manifests of sets made before the settings were named after their flags."""
        return {"iterations": self.iterations, "lr": self.settings.activation_lr, "cuts": self.cuts,
                "lookahead_weight": self.settings.lookahead_weight}

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
        optimizer = torch.optim.Adam([inputs], lr=cfg.activation_lr, betas=(0.5, 0.9))
        best_loss, best = math.inf, inputs.detach().clone()
        try:
            for step in range(self.iterations):
                for group in optimizer.param_groups:
                    group["lr"] = 0.5 * cfg.activation_lr * (1 + math.cos(math.pi * step / self.iterations))
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


GENERATORS.add("activations", GeneratorEntry(
    build=lambda settings, teacher, competitor, seed: ActivationSynthesizer(teacher, settings.section(),
                                                                           settings.iterations),
    summary="each neighbourhood's input activations, no image (for distill --inputs activations)",
    settings=ActivationSettings,
    reads=("iterations",),
    output="activations",
))
