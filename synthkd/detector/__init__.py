"""The failure detector: a density model of a classifier's features, calibrated with conformal
p-values, plus the baselines, attacks and metrics to evaluate it. Scores everywhere follow one
convention: higher = more typical (see :mod:`synthkd.detector.density`)."""

from .baselines import KNearestNeighbours, Mahalanobis, energy, max_softmax
from .conformal import conformal_p_values
from .density import FeatureScorer
from .detector import Detector
from .features import Features, cached_extract, default_layer, extract
from .flow import NormalizingFlow
from .gmm import GaussianMixture
from .metrics import detection_metrics, mann_whitney

DENSITIES = {
    "gmm": lambda components, seed, **options: GaussianMixture(components, "full", seed=seed, **options),
    "gmm-diag": lambda components, seed, **options: GaussianMixture(components, "diag", seed=seed, **options),
    "flow": lambda components, seed: NormalizingFlow(architecture="maf", seed=seed),
    "flow-nsf": lambda components, seed: NormalizingFlow(architecture="nsf", seed=seed),
}

__all__ = [
    "DENSITIES", "Detector", "FeatureScorer", "Features", "GaussianMixture", "KNearestNeighbours", "Mahalanobis",
    "NormalizingFlow", "cached_extract", "conformal_p_values", "default_layer", "detection_metrics", "energy",
    "extract", "mann_whitney", "max_softmax",
]
