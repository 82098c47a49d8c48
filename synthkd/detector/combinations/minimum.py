"""The min rule (Bonferroni): parts * min(p), capped at 1. An input is as atypical as its most
atypical part; one part alone can flag it."""

from __future__ import annotations

import torch

from . import COMBINATIONS


@COMBINATIONS.register("min")
def minimum(p_values: torch.Tensor) -> torch.Tensor:
    return (p_values.shape[1] * p_values.min(1).values).clamp_max(1.0)
