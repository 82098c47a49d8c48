"""A Gaussian mixture fitted by EM, in torch so it runs wherever the features are (CPU or GPU).

k-means++ initialisation and a few Lloyd steps, then EM until the mean log-likelihood per
sample changes by less than ``tol`` (1e-3, as in scikit-learn). Large sets are fitted coarse to
fine: EM (and the BIC choice) on a random subset of ``subset_size`` rows, then at most
``refine_iter`` EM passes over every row from that solution. Full EM on 60k features takes a
minute or more on a CPU (dozens of passes); this takes seconds, and the few passes recover most
of the likelihood (benchmarks/detector_fashion_mnist.py measures both). Every covariance gets
``reg_covar`` added to its diagonal (more, step by step, if a Cholesky factorisation still
fails), so constant or collinear features do not crash it. Without ``components`` the number of
components is the candidate with the lowest BIC. Computed in float64: log-densities of 64+
dimensional features lose too much in float32.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Sequence

import torch

from ...errors import SynthkdError
from ..density import FeatureScorer
from ..features import check_finite
from . import DENSITIES, DensitySettings

REG_COVAR = 1e-4  # the numerical floor; a density smoothed for synthetic features uses a larger one
COVARIANCES = ("full", "diag")


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator, lloyd_steps: int = 10) -> torch.Tensor:
    """k centres: greedy k-means++ seeding (each step draws 2 + log k candidates with probability ~
    squared distance and keeps the one that lowers the total squared distance most), refined by a
    few Lloyd steps."""
    n = len(x)
    trials = 2 + int(math.log(k))
    centres = x[torch.randint(n, (1,), generator=generator)]
    nearest = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = nearest.sum()
        probabilities = (nearest / total if total > 0 else torch.full_like(nearest, 1.0 / n)).cpu()
        candidates = x[torch.multinomial(probabilities, trials, replacement=True, generator=generator).to(x.device)]
        updated = torch.minimum(nearest[None], torch.cdist(candidates, x) ** 2)  # trials x N
        best = int(updated.sum(1).argmin())
        centres = torch.cat([centres, candidates[best:best + 1]])
        nearest = updated[best]
    for _ in range(lloyd_steps):
        assignment = torch.cdist(x, centres).argmin(1)
        counts = torch.bincount(assignment, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assignment, x)
        occupied = counts > 0  # an empty cluster keeps its centre
        centres[occupied] = sums[occupied] / counts[occupied, None]
    return centres


class GaussianMixture(FeatureScorer):
    """Unsupervised density of features; score = log-likelihood under the mixture."""

    kind = "gmm"

    def __init__(
        self,
        components: int | None = None,
        covariance: str = "full",
        reg_covar: float = REG_COVAR,
        max_iter: int = 100,
        tol: float = 1e-3,
        seed: int = 0,
        candidates: Sequence[int] = (1, 2, 4, 8, 16),
        bic: dict[str, float] | None = None,
        subset_size: int | None = 8192,
        refine_iter: int = 5,
    ):
        super().__init__()
        if covariance not in COVARIANCES:
            raise SynthkdError(f"unknown covariance {covariance!r}; use one of {', '.join(COVARIANCES)}")
        if components is not None and components < 1:
            raise SynthkdError(f"components must be at least 1, got {components}")
        self.components = components
        self.covariance = covariance
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.candidates = tuple(int(c) for c in candidates)
        self.bic = dict(bic or {})  # BIC of each candidate, when the number of components was chosen by BIC
        self.subset_size = subset_size
        self.refine_iter = refine_iter
        self.converged = False

    @classmethod
    def from_settings(cls, settings: DensitySettings, seed: int, covariance: str = "full") -> "GaussianMixture":
        """The mixture of the calibration settings: their ``smoothing`` is the covariance floor."""
        return cls(settings.components, covariance, seed=seed, reg_covar=max(REG_COVAR, settings.smoothing))

    def get_config(self) -> dict[str, Any]:
        return {"components": self.components, "covariance": self.covariance, "reg_covar": self.reg_covar,
                "max_iter": self.max_iter, "tol": self.tol, "seed": self.seed, "candidates": list(self.candidates),
                "bic": self.bic, "subset_size": self.subset_size,
                "refine_iter": self.refine_iter}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in ("weights", "means", "covariances"):
            if name not in tensors:
                raise SynthkdError(f"saved Gaussian mixture lacks {name!r}; re-fit and save it again")
            self.register_buffer(name, tensors[name])
        self.components = len(tensors["weights"])

    # ------------------------------------------------------------------ fitting
    def fit_features(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> "GaussianMixture":
        x = self._as_float64(check_finite(features))
        if len(x) < 2:
            raise SynthkdError(f"a Gaussian mixture needs at least 2 feature vectors, got {len(x)}")
        generator = torch.Generator().manual_seed(self.seed)
        coarse = x
        if self.subset_size is not None and len(x) > self.subset_size:
            coarse = x[torch.randperm(len(x), generator=generator)[: self.subset_size].to(x.device)]
        if self.components is not None:
            params, _ = self._em(coarse, min(self.components, len(coarse)))
        else:
            candidates = sorted({c for c in self.candidates if c <= len(coarse) // 2} or {1})
            best = None
            for k in candidates:
                candidate, log_likelihood = self._em(coarse, k)
                bic = -2.0 * log_likelihood + self._num_parameters(k, x.shape[1]) * math.log(len(coarse))
                self.bic[str(k)] = bic
                if best is None or bic < best[0]:
                    best = (bic, candidate)
            params = best[1]
        if coarse is not x:
            params, _ = self._em(x, len(params[0]), params, self.refine_iter)
        for name, value in zip(("weights", "means", "covariances"), params):
            self.register_buffer(name, value)
        self.components = len(self.weights)
        return self

    def _num_parameters(self, k: int, d: int) -> int:
        per_component = d * (d + 1) // 2 if self.covariance == "full" else d
        return (k - 1) + k * d + k * per_component

    def _em(self, x: torch.Tensor, k: int, params: tuple[torch.Tensor, ...] | None = None,
            max_iter: int | None = None) -> tuple[tuple[torch.Tensor, ...], float]:
        """EM from ``params`` (weights, means, covariances), or else from a k-means++ start, for at
        most ``max_iter`` passes; returns the fitted parameters and the total log-likelihood."""
        max_iter = self.max_iter if max_iter is None else max_iter
        if params is None:
            centres = kmeans_plus_plus(x, k, torch.Generator().manual_seed(self.seed))
            params = self._m_step(x, torch.nn.functional.one_hot(torch.cdist(x, centres).argmin(1), k).to(x.dtype))
        previous = -math.inf
        for iteration in range(max_iter + 1):
            log_joint = self._log_joint(x, *params)
            per_sample = torch.logsumexp(log_joint, 1)
            mean_log_likelihood = float(per_sample.mean())
            self.converged = abs(mean_log_likelihood - previous) < self.tol
            if self.converged or iteration == max_iter:
                break
            previous = mean_log_likelihood
            params = self._m_step(x, torch.exp(log_joint - per_sample[:, None]))
        return params, float(per_sample.sum())

    def _m_step(self, x: torch.Tensor, responsibilities: torch.Tensor) -> tuple[torch.Tensor, ...]:
        counts = responsibilities.sum(0) + 10 * torch.finfo(x.dtype).eps
        means = responsibilities.T @ x / counts[:, None]
        d = x.shape[1]
        if self.covariance == "full":
            covariances = torch.empty(len(counts), d, d, dtype=x.dtype, device=x.device)
            for j in range(len(counts)):
                centred = x - means[j]
                covariances[j] = (responsibilities[:, j, None] * centred).T @ centred / counts[j]
                covariances[j].diagonal().add_(self.reg_covar)
        else:
            covariances = responsibilities.T @ (x * x) / counts[:, None] - means**2
            covariances = covariances.clamp_min(0) + self.reg_covar
        return counts / counts.sum(), means, covariances

    # ------------------------------------------------------------------ scoring
    def _log_joint(self, x: torch.Tensor, weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor) -> torch.Tensor:
        """log(weight_j) + log N(x | mean_j, cov_j) for every sample and component, N x K."""
        d = x.shape[1]
        columns = []
        if self.covariance == "full":
            cholesky = self._cholesky(covariances)
            for j in range(len(weights)):
                z = torch.linalg.solve_triangular(cholesky[j], (x - means[j]).T, upper=False)
                log_det = 2 * cholesky[j].diagonal().log().sum()
                columns.append(-0.5 * ((z**2).sum(0) + log_det + d * math.log(2 * math.pi)))
            log_gauss = torch.stack(columns, 1)
        else:
            log_gauss = -0.5 * (
                (((x[:, None, :] - means[None]) ** 2) / covariances[None]).sum(2)
                + covariances.log().sum(1)[None] + d * math.log(2 * math.pi)
            )
        return log_gauss + weights.log()[None]

    def _cholesky(self, covariances: torch.Tensor) -> torch.Tensor:
        """Cholesky factors, adding regularisation tenfold until every factorisation succeeds."""
        extra = 0.0
        eye = torch.eye(covariances.shape[-1], dtype=covariances.dtype, device=covariances.device)
        for _ in range(12):
            cholesky, info = torch.linalg.cholesky_ex(covariances + extra * eye)
            if not bool(info.any()):
                return cholesky
            extra = max(extra * 10, self.reg_covar)
        raise SynthkdError("the Gaussian mixture's covariances are not positive definite even after regularisation; "
                           "raise reg_covar or use covariance='diag'")

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        """Log-likelihood of each row under the mixture."""
        return torch.logsumexp(self.component_log_joint(features), 1).float()

    def component_log_joint(self, features: torch.Tensor) -> torch.Tensor:
        """log(weight_j) + log N(x | mean_j, cov_j) per row and component (N x K, float64): what
        the class-conditional scores of the detector read."""
        self._check_fitted()
        x = self._check_dim(self._as_float64(features), self.means.shape[1])
        return self._log_joint(x, self.weights, self.means, self.covariances)

    def _as_float64(self, features: torch.Tensor) -> torch.Tensor:
        device = self.means.device if self.fitted else features.device
        return features.to(device=device, dtype=torch.float64)


DENSITIES.add("gmm", GaussianMixture.from_settings)
DENSITIES.add("gmm-diag", partial(GaussianMixture.from_settings, covariance="diag"))
