"""Fisher's rule: minus Fisher's statistic, 2 * sum(log p). Under independent uniform p-values
Fisher's statistic is chi-squared with 2 * parts degrees of freedom; evidence from every part
adds up, so two moderately small p-values outweigh one small one."""

from __future__ import annotations

import torch

from . import COMBINATIONS


@COMBINATIONS.register("fisher")
def fisher(p_values: torch.Tensor) -> torch.Tensor:
    return 2 * p_values.log().sum(1)
