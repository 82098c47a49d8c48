"""Detection metrics, by the conventions of :mod:`synthkd.detector` (positives are failures; the
detection score of an input is minus its scorer score).

- AUROC: probability that a failure scores as less typical than a negative (scikit-learn's
  roc_auc_score on raw scores; no sigmoid squashing).
- AUPR-out: average precision with failures as the positive class; AUPR-in: with the
  in-distribution inputs as positives (ranked by the score itself).
- FPR at 95% TPR: the fraction of negatives flagged at the threshold that flags 95% of failures.
- Mann-Whitney U: the statistic that failures score lower than negatives (one-sided), its
  p-value, and the AUROC it implies, U / (n_failures * n_negatives).

scikit-learn and scipy are imported where they are used: they take seconds to load, and every
command line start loads this package (for the detector's settings).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import SynthkdError

CONVENTION = "positives = failures; scores: higher = more typical; AUROC from scikit-learn on raw scores"
"""The conventions of :mod:`synthkd.detector`, as every metrics file records them."""


def _labelled(negatives: torch.Tensor, failures: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    if len(negatives) == 0 or len(failures) == 0:
        raise SynthkdError(f"need both negatives and failures to measure detection (got {len(negatives)} and {len(failures)})")
    detection = -torch.cat([negatives, failures]).double().cpu().numpy()
    is_failure = np.concatenate([np.zeros(len(negatives)), np.ones(len(failures))])
    return is_failure, detection


def fpr_at_tpr(is_failure: np.ndarray, detection: np.ndarray, tpr: float = 0.95) -> float:
    from sklearn.metrics import roc_curve

    false_positive_rate, true_positive_rate, _ = roc_curve(is_failure, detection)
    return float(false_positive_rate[np.searchsorted(true_positive_rate, tpr, side="left")])


def detection_metrics(negatives: torch.Tensor, failures: torch.Tensor) -> dict[str, float]:
    """AUROC, AUPR-in, AUPR-out and FPR at 95% TPR from scorer scores."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    is_failure, detection = _labelled(negatives, failures)
    return {
        "auroc": float(roc_auc_score(is_failure, detection)),
        "aupr_in": float(average_precision_score(1 - is_failure, -detection)),
        "aupr_out": float(average_precision_score(is_failure, detection)),
        "fpr_at_95_tpr": fpr_at_tpr(is_failure, detection),
        "num_negatives": int(len(negatives)),
        "num_failures": int(len(failures)),
    }


def mann_whitney(negatives: torch.Tensor, failures: torch.Tensor) -> dict[str, Any]:
    """One-sided Mann-Whitney U test that failures score lower (less typical) than negatives."""
    failures_np, negatives_np = failures.double().cpu().numpy(), negatives.double().cpu().numpy()
    if len(failures_np) == 0 or len(negatives_np) == 0:
        raise SynthkdError("the Mann-Whitney test needs scores of both groups")
    from scipy.stats import mannwhitneyu

    result = mannwhitneyu(-failures_np, -negatives_np, alternative="greater")
    return {
        "statistic": float(result.statistic),
        "p_value": float(result.pvalue),
        "implied_auroc": float(result.statistic) / (len(failures_np) * len(negatives_np)),
        "num_failures": int(len(failures_np)),
        "num_negatives": int(len(negatives_np)),
    }
