"""Rules that combine the conformal p-values of several scores into one score: one module each,
registered by itself in :data:`COMBINATIONS` (imported on first use, like the densities).

A rule takes the p-values of the parts (N x parts, each in (0, 1]) and returns one combined score
per input, **higher = more typical** like every score of :mod:`synthkd.detector`. The combined
score is not itself a p-value (the parts are dependent, e.g. density and confidence of the same
features): the detector calibrates it again against held-out combined scores, so the final
p-value keeps its guarantee whatever the dependence.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

import torch

from ...errors import SynthkdError
from ...registry import Registry

Rule = Callable[[torch.Tensor], torch.Tensor]


def _import_rules() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


COMBINATIONS: Registry[Rule] = Registry("combination rule", loader=_import_rules)


def combine(rule: str, p_values: torch.Tensor) -> torch.Tensor:
    """The combined score of ``p_values`` (N x parts) by the rule named ``rule``."""
    if p_values.ndim != 2 or p_values.shape[1] < 1:
        raise SynthkdError(f"a combination rule needs p-values N x parts, got shape {tuple(p_values.shape)}")
    return COMBINATIONS.get(rule)(p_values.double()).float()
