"""Baselines of the detection literature, scoring by the convention of :mod:`synthkd.detector`.
Each registers itself: :data:`LOGIT_SCORES` (from the logits alone) and :data:`BASELINES`
(feature scorers fitted at calibration beside the detector, on the same features).

- maximum softmax probability (Hendrycks & Gimpel 2017), energy (Liu et al. 2020) and DOCTOR
  (Granese et al. 2021, its D_alpha without input perturbation, at temperature 1): from logits, no fit;
- Mahalanobis (Lee et al. 2018): class means of the features under the *predicted* labels and one
  shared covariance; score = minus the smallest squared Mahalanobis distance to a class mean;
- k-nearest neighbours (Sun et al. 2022): features scaled to unit length; score = minus the
  distance to the k-th nearest fitted feature.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import SynthkdError
from ..registry import Registry
from .density import FeatureScorer
from .features import check_finite

LOGIT_SCORES: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("logit score")
BASELINES: Registry[Callable[[], FeatureScorer]] = Registry("baseline")


@LOGIT_SCORES.register("msp")
def max_softmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().softmax(1).max(1).values


@LOGIT_SCORES.register("energy")
def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Minus the free energy, T * logsumexp(logits / T): high for confident inputs."""
    return temperature * torch.logsumexp(logits.float() / temperature, 1)


@LOGIT_SCORES.register("doctor")
def doctor(logits: torch.Tensor) -> torch.Tensor:
    """The softmax's sum of squares g(x) = sum p_i^2: DOCTOR rejects where (1 - g) / g is large,
    the same ranking as a low g."""
    return logits.float().softmax(1).pow(2).sum(1)


@BASELINES.register("mahalanobis")
class Mahalanobis(FeatureScorer):
    """Class-conditional Gaussians with a shared covariance, on the classifier's predicted labels."""

    kind = "mahalanobis"

    def __init__(self, reg_covar: float = 1e-6):
        super().__init__()
        self.reg_covar = reg_covar

    def get_config(self) -> dict[str, Any]:
        return {"reg_covar": self.reg_covar}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.register_buffer("means", tensors["means"])
        self.register_buffer("precision", tensors["precision"])

    def fit_features(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> "Mahalanobis":
        if labels is None:
            raise SynthkdError("Mahalanobis needs the predicted label of every feature vector")
        x = check_finite(features).double()
        classes = labels.to(x.device).long()
        present = classes.unique()
        means = torch.stack([x[classes == c].mean(0) for c in present])
        centred = x - means[torch.searchsorted(present, classes)]
        covariance = centred.T @ centred / len(x)
        covariance.diagonal().add_(self.reg_covar * covariance.diagonal().mean().clamp_min(1e-12))
        self.register_buffer("means", means)
        self.register_buffer("precision", torch.linalg.pinv(covariance, hermitian=True))
        return self

    @torch.no_grad()
    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        x = self._check_dim(features, self.means.shape[1]).to(self.means.device, torch.float64)
        distances = []
        for chunk in x.split(8192):
            centred = chunk[:, None, :] - self.means[None]  # N x C x D
            distances.append(torch.einsum("ncd,de,nce->nc", centred, self.precision, centred).min(1).values)
        return -torch.cat(distances).float()


@BASELINES.register("knn")
class KNearestNeighbours(FeatureScorer):
    """Distance to the k-th nearest fitted feature after scaling every feature to unit length."""

    kind = "knn"

    def __init__(self, k: int = 50):
        super().__init__()
        if k < 1:
            raise SynthkdError(f"k must be at least 1, got {k}")
        self.k = k

    def get_config(self) -> dict[str, Any]:
        return {"k": self.k}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.register_buffer("bank", tensors["bank"])

    def fit_features(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> "KNearestNeighbours":
        self.register_buffer("bank", torch.nn.functional.normalize(check_finite(features).float(), dim=1))
        return self

    @torch.no_grad()
    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        x = torch.nn.functional.normalize(self._check_dim(features, self.bank.shape[1]).float(), dim=1)
        k = min(self.k, len(self.bank))
        x = x.to(self.bank.device)
        return -torch.cat([torch.cdist(chunk, self.bank).topk(k, largest=False).values[:, -1] for chunk in x.split(1024)])
