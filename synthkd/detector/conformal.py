"""Conformal p-values from held-out calibration scores.

With calibration scores s_1..s_n of in-distribution inputs (scored by the convention
of :mod:`synthkd.detector`, so atypical inputs get small p-values), the p-value
of a new score s is ``(1 + #{i : s_i <= s}) / (n + 1)``: the rank of s among the calibration
scores. When the new input is exchangeable with the calibration inputs, P(p <= alpha) <= alpha,
so flagging ``p < alpha`` raises false alarms on in-distribution data at a rate of at most alpha.
"""

from __future__ import annotations

import torch

from ..errors import SynthkdError


def conformal_p_values(scores: torch.Tensor, calibration_scores: torch.Tensor) -> torch.Tensor:
    """p-value of each score against the calibration scores (see the module docstring)."""
    calibration = calibration_scores.detach().flatten().double().cpu().sort().values
    if len(calibration) == 0:
        raise SynthkdError("no calibration scores: calibrate the detector on a held-out part (holdout > 0)")
    if not torch.isfinite(calibration).all():
        raise SynthkdError("the calibration scores hold NaN or inf; re-calibrate the detector")
    values = scores.detach().double().cpu()
    at_or_below = torch.searchsorted(calibration, values, right=True)
    return ((1 + at_or_below) / (len(calibration) + 1)).float()


def interpolated_p_values(scores: torch.Tensor, reference_scores: torch.Tensor) -> torch.Tensor:
    """The conformal p-value with the count of reference scores at or below a score interpolated
    linearly between neighbouring reference scores: continuous in the score, so scores combined
    from several of them (:mod:`synthkd.detector.combinations`) rarely tie, and the conformal
    p-value of the combination stays uniform rather than conservative. In (0, 1]."""
    reference = reference_scores.detach().flatten().double().cpu().sort().values
    if len(reference) == 0 or not torch.isfinite(reference).all():
        raise SynthkdError("the reference scores are empty or hold NaN or inf; re-calibrate the detector")
    values = scores.detach().double().cpu()
    above = torch.searchsorted(reference, values, right=True).clamp(1, len(reference) - 1) if len(reference) > 1 else None
    if above is None:
        counts = (values >= reference[0]).double()
    else:
        low, high = reference[above - 1], reference[above]
        fraction = ((values - low) / (high - low).clamp_min(1e-300)).clamp(0, 1)
        counts = torch.where(values < reference[0], torch.zeros_like(values), above - 1 + fraction + 1)
        counts = torch.where(values >= reference[-1], torch.full_like(values, len(reference)), counts)
    return ((1 + counts) / (len(reference) + 1)).float()


def alpha_problem(alpha: float) -> str | None:
    """What is wrong with a false-alarm rate, or None (the check of every ``alpha`` setting)."""
    return None if 0 < alpha < 1 else f"is a false-alarm rate and must lie in (0, 1), got {alpha:g}"


def check_alpha(alpha: float) -> float:
    problem = alpha_problem(alpha)
    if problem:
        raise SynthkdError(f"alpha {problem}")
    return float(alpha)
