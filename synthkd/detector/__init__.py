"""The failure detector: a density model of a classifier's features, calibrated with conformal
p-values, plus the baselines, attacks and metrics to evaluate it. Scores everywhere follow one
convention: higher = more typical (see :mod:`synthkd.detector.density`)."""

from ..errors import SynthkdError
from .baselines import KNearestNeighbours, Mahalanobis, energy, max_softmax
from .conformal import conformal_p_values
from .density import FeatureScorer
from .detector import Detector
from .features import Features, cached_extract, default_layer, extract
from .flow import NormalizingFlow
from .gmm import REG_COVAR, GaussianMixture
from .metrics import detection_metrics, mann_whitney

DENSITIES = {
    "gmm": lambda components, seed, smoothing: GaussianMixture(components, "full", seed=seed,
                                                                reg_covar=max(REG_COVAR, smoothing)),
    "gmm-diag": lambda components, seed, smoothing: GaussianMixture(components, "diag", seed=seed,
                                                                     reg_covar=max(REG_COVAR, smoothing)),
    "flow": lambda components, seed, smoothing: NormalizingFlow(architecture="maf", seed=seed, smoothing=smoothing),
    "flow-nsf": lambda components, seed, smoothing: NormalizingFlow(architecture="nsf", seed=seed, smoothing=smoothing),
}


def build_density(name: str, components: int | None = None, seed: int = 0, smoothing: float = 0.0) -> FeatureScorer:
    """An unfitted density by name. ``smoothing`` widens it by Gaussian noise of that variance (in
    standardised feature units): a mixture adds it to every covariance's diagonal during EM, a flow
    is trained on noisy features. Synthetic features spread less than real ones; smoothing keeps
    the density from calling real inputs atypical along directions the synthetic set barely varies in."""
    if name not in DENSITIES:
        raise SynthkdError(f"unknown density {name!r}; use one of {', '.join(DENSITIES)}")
    if smoothing < 0:
        raise SynthkdError(f"smoothing is a noise variance and must be 0 (off) or positive, got {smoothing}")
    return DENSITIES[name](components, seed, float(smoothing))


__all__ = [
    "DENSITIES", "Detector", "build_density", "FeatureScorer", "Features", "GaussianMixture", "KNearestNeighbours", "Mahalanobis",
    "NormalizingFlow", "cached_extract", "conformal_p_values", "default_layer", "detection_metrics", "energy",
    "extract", "mann_whitney", "max_softmax",
]
