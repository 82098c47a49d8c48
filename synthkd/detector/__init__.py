"""The failure detector: a density model of a classifier's features, calibrated with conformal
p-values, plus the baselines, attacks and metrics to evaluate it.

Conventions, stated here once for the whole package:

- **Scores: higher = more typical** (the opposite sign of pytorch-ood's outlier scores, kept
  since the first release). Every scorer (a density's log-likelihood, a baseline's negative
  distance, MSP, energy, DOCTOR, the detector's combined score) gives in-distribution inputs
  high scores; a conformal p-value is small for a low score, and an input is flagged when its
  p-value is below alpha.
- **Metrics: positives are failures** (misclassified, out-of-distribution or adversarial inputs),
  negatives the in-distribution inputs the classifier handles; the detection score of an input
  is minus its scorer score.
- The interface, after pytorch-ood's detectors: ``fit_features(features)`` /
  ``score_features(features)`` on feature matrices, ``fit(model, dataset)`` / ``score(model,
  images)`` through a classifier's features (:class:`FeatureScorer`).

The parts a user picks by name live in registries (:mod:`synthkd.registry`): :data:`DENSITIES`
(one module each in :mod:`synthkd.detector.densities`), :data:`BASELINES` and
:data:`LOGIT_SCORES` (the evaluation's baselines), :data:`ATTACKS`, :data:`SCORERS` (every
saved scorer kind), :data:`PARTS` (what a detector can flag by) and :data:`COMBINATIONS` (rules
combining the parts' p-values).
"""

from .attacks import ATTACKS
from .baselines import BASELINES, LOGIT_SCORES, KNearestNeighbours, Mahalanobis, doctor, energy, max_softmax
from .conformal import conformal_p_values
from .densities import DENSITIES, build_density
from .densities.gmm import REG_COVAR, GaussianMixture
from .densities.flow import NormalizingFlow
from .density import SCORERS, FeatureScorer
from .detector import Detector
from .features import Features, cached_extract, default_layer, extract
from .combinations import COMBINATIONS
from .parts import PARTS
from .metrics import CONVENTION, detection_metrics, mann_whitney

__all__ = [
    "ATTACKS", "BASELINES", "COMBINATIONS", "CONVENTION", "PARTS", "DENSITIES", "Detector", "FeatureScorer", "Features", "GaussianMixture",
    "KNearestNeighbours", "LOGIT_SCORES", "Mahalanobis", "NormalizingFlow", "REG_COVAR", "SCORERS", "build_density",
    "cached_extract", "conformal_p_values", "default_layer", "detection_metrics", "doctor", "energy", "extract",
    "mann_whitney", "max_softmax",
]
