"""The scores a detector can flag by, alone or combined (:mod:`synthkd.detector.combinations`):
each part registers itself in :data:`PARTS` with what it computes from a fitted detector and an
input's :class:`~synthkd.detector.features.Features`, and what it needs of the detector.

- ``density``: the label-free density's log-likelihood of the features (with the BatchNorm term
  when the detector weighs it);
- ``msp``, ``energy``, ``doctor``: the classifier's confidence, from its logits (no fit);
- ``class-density``: log p(x, predicted class) under the mixture, each component labelled by the
  classifier's predictions on the fitting features (log sum_k w_k P(c | k) N(x | k)): an input
  predicted c but lying where the fitting inputs were classified otherwise is atypical. No class
  labels: only the classifier's own predictions. Needs a Gaussian-mixture density;
- ``agreement``: log P(predicted class | x) under the same labelled mixture (class-density minus
  the mixture's log-likelihood): whether the region of x agrees with the classifier; a mistake
  score, blind to how far out x lies;
- ``batchnorm``: the BatchNorm term alone (minus the mean deviation from the stored statistics).

Higher = more typical, as everywhere in :mod:`synthkd.detector`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..registry import Registry
from .baselines import LOGIT_SCORES
from .densities.gmm import GaussianMixture
from .features import Features

Detector = Any  # a synthkd.detector.Detector; not imported, since the detector imports this module


@dataclass(frozen=True)
class Part:
    """``compute(detector, data)``: one score per input; ``needs(detector)``: what the detector
    lacks to compute it (a phrase naming the fix), or None."""

    compute: Callable[[Detector, Features], torch.Tensor]
    needs: Callable[[Detector], str | None] = lambda detector: None


PARTS: Registry[Part] = Registry("score part")
CLASS_PSEUDO_COUNT = 1.0  # spread over the classes of every component, so no class is impossible


def _density(detector: Detector, data: Features) -> torch.Tensor:
    return detector.score_features(data.features, data.deviations)


PARTS.add("density", Part(_density))
for _name in LOGIT_SCORES.names():
    PARTS.add(_name, Part(lambda detector, data, score=LOGIT_SCORES.get(_name): score(data.logits).cpu()))


def _needs_labelled_mixture(detector: Detector) -> str | None:
    if not isinstance(detector.density, GaussianMixture):
        return f"a Gaussian-mixture density (this detector's is {detector.density.kind}); calibrate with --density gmm"
    if detector.component_classes is None:
        return "the classes of the mixture's components; calibrate the detector again"
    return None


def component_classes(mixture: GaussianMixture, standardized: torch.Tensor, predictions: torch.Tensor,
                      num_classes: int) -> torch.Tensor:
    """log P(class | component), K x C, from the responsibilities of the fitting features and the
    classifier's predictions on them."""
    log_joint = mixture.component_log_joint(standardized)
    responsibilities = (log_joint - torch.logsumexp(log_joint, 1, keepdim=True)).exp().cpu()
    onehot = torch.nn.functional.one_hot(predictions.long().cpu(), num_classes).double()
    counts = responsibilities.T @ onehot + CLASS_PSEUDO_COUNT / num_classes
    return (counts / counts.sum(1, keepdim=True)).log().float()


def _class_log_joint(detector: Detector, data: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(x, predicted class), log p(x)) under the labelled mixture."""
    log_joint = detector.density.component_log_joint(detector.standardize(data.features)).cpu()
    classes = detector.component_classes.double()[:, data.predictions.cpu()].T  # N x K: log P(predicted | k)
    return torch.logsumexp(log_joint + classes, 1), torch.logsumexp(log_joint, 1)


PARTS.add("class-density", Part(lambda detector, data: _class_log_joint(detector, data)[0].float(),
                                _needs_labelled_mixture))
PARTS.add("agreement", Part(lambda detector, data: torch.subtract(*_class_log_joint(detector, data)).float(),
                            _needs_labelled_mixture))


PARTS.add("batchnorm", Part(lambda detector, data: detector.batchnorm_score(data.deviations),
                            lambda detector: None if detector.batchnorm else
                            "BatchNorm layers; calibrate with a positive --batchnorm-weight"))
