"""The min rule (Bonferroni): parts * min(p). An input is as atypical as its most atypical part;
one part alone can flag it. Not capped at 1 (as a Bonferroni p-value would be): the cap would tie
every input whose parts all lie above 1/parts, and the detector calibrates the score anyway."""

from __future__ import annotations

import torch

from . import COMBINATIONS


@COMBINATIONS.register("min")
def minimum(p_values: torch.Tensor) -> torch.Tensor:
    return p_values.shape[1] * p_values.min(1).values
