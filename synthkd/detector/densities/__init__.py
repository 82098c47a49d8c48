"""The density models a detector is calibrated with: one module each, registered by itself.

Every module of this package adds its densities to :data:`DENSITIES` when it is imported, and the
registry imports them all on first use, so a new density is one module here (plus its test):
``synthkd calibrate --density``, the run schema's ``detector.density`` and every listing read the
registry. An entry is a factory ``(settings, seed) -> FeatureScorer`` making an unfitted scorer
from the calibration settings (:class:`synthkd.detector.settings.CalibrationSettings`).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Protocol

from ...registry import Registry
from ..density import FeatureScorer


class DensitySettings(Protocol):
    """What a density factory reads of the calibration settings."""

    density: str
    components: int | None
    smoothing: float


DensityFactory = Callable[[DensitySettings, int], FeatureScorer]


def _import_densities() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


DENSITIES: Registry[DensityFactory] = Registry("density", loader=_import_densities)


def build_density(settings: DensitySettings, seed: int = 0) -> FeatureScorer:
    """An unfitted density of the kind ``settings.density`` names. The settings' ``smoothing``
    widens it by Gaussian noise of that variance (in standardised feature units): a mixture adds
    it to every covariance's diagonal during EM, a flow is trained on noisy features."""
    return DENSITIES.get(settings.density)(settings, seed)
