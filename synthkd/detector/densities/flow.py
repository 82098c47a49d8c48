"""A normalizing flow on features (zuko's MAF or NSF), trained by maximum likelihood with Adam.

Inputs are standardised with the training mean/std (kept as buffers, and accounted for in the
log-density), a tenth of the training features is held out, and the weights with the best
held-out likelihood are kept (early stopping), which matters on small synthetic sets. With
``smoothing`` > 0 the flow is trained on the standardised features plus Gaussian noise of that
variance, so it models the features convolved with that noise: the flow's counterpart of a
Gaussian mixture's covariance floor (see :func:`synthkd.detector.densities.build_density`).
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any, Sequence

import torch

from ...errors import SynthkdError
from ..density import FeatureScorer
from ..features import check_finite
from . import DENSITIES, DensitySettings

ARCHITECTURES = ("maf", "nsf")  # zuko.flows.MAF / NSF, imported when a flow is built (a slow import)


class NormalizingFlow(FeatureScorer):
    """Unsupervised density of features; score = log-likelihood under the flow."""

    kind = "flow"

    def __init__(
        self,
        features: int | None = None,
        architecture: str = "maf",
        transforms: int = 4,
        hidden_features: Sequence[int] = (128, 128),
        epochs: int = 40,
        batch_size: int = 512,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        patience: int = 5,
        seed: int = 0,
        smoothing: float = 0.0,
    ):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise SynthkdError(f"unknown flow {architecture!r}; use one of {', '.join(ARCHITECTURES)}")
        self.architecture = architecture
        self.transforms = transforms
        self.hidden_features = tuple(int(h) for h in hidden_features)
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.patience = patience
        self.seed = seed
        self.smoothing = float(smoothing)
        self.features = None
        self.flow = None
        self.history: list[float] = []
        if features is not None:
            self._build(features)

    def _build(self, features: int) -> None:
        self.features = int(features)
        import zuko

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.flow = {"maf": zuko.flows.MAF, "nsf": zuko.flows.NSF}[self.architecture](
                features=self.features, context=0, transforms=self.transforms, hidden_features=self.hidden_features
            )
        self.register_buffer("shift", torch.zeros(self.features))
        self.register_buffer("scale", torch.ones(self.features))

    @classmethod
    def from_settings(cls, settings: DensitySettings, seed: int, architecture: str = "maf") -> "NormalizingFlow":
        """The flow of the calibration settings (the number of components is a mixture's setting)."""
        return cls(architecture=architecture, seed=seed, smoothing=settings.smoothing)

    def get_config(self) -> dict[str, Any]:
        return {"features": self.features, "architecture": self.architecture, "transforms": self.transforms,
                "hidden_features": list(self.hidden_features), "epochs": self.epochs, "batch_size": self.batch_size,
                "lr": self.lr, "weight_decay": self.weight_decay, "patience": self.patience, "seed": self.seed,
                "smoothing": self.smoothing}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.flow is None:
            raise SynthkdError("saved flow config lacks 'features'; re-fit and save it again")
        try:
            self.load_state_dict(tensors)
        except RuntimeError as error:
            raise SynthkdError(f"saved flow weights do not fit its config: {error}") from error

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow().log_prob((x - self.shift) / self.scale) - self.scale.log().sum()

    def fit_features(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> "NormalizingFlow":
        x = check_finite(features).float()
        if len(x) < 10:
            raise SynthkdError(f"a normalizing flow needs at least 10 feature vectors, got {len(x)}")
        self._build(x.shape[1])
        self.to(x.device)
        std = x.std(0)
        self.shift.copy_(x.mean(0))
        self.scale.copy_(torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std)))
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(x), generator=generator).to(x.device)
        held_out = max(1, len(x) // 10)
        validation, train = x[order[:held_out]], x[order[held_out:]]
        noise_std = self.smoothing ** 0.5 * self.scale

        def noisy(rows: torch.Tensor) -> torch.Tensor:
            if not self.smoothing:
                return rows
            noise = torch.randn(rows.shape, generator=generator).to(rows.device)
            return rows + noise_std * noise

        validation = noisy(validation)  # drawn once: the held-out likelihood compares epochs on the same rows
        optimizer = torch.optim.Adam(self.flow.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        best, best_state, stale = -float("inf"), None, 0
        self.history = []
        for _ in range(self.epochs):
            self.flow.train()
            for batch in torch.randperm(len(train), generator=generator).to(x.device).split(self.batch_size):
                loss = -self._log_prob(noisy(train[batch])).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            self.flow.eval()
            with torch.no_grad():
                validation_log_prob = float(self._log_prob(validation).mean())
            self.history.append(validation_log_prob)
            if validation_log_prob > best:
                best, best_state, stale = validation_log_prob, copy.deepcopy(self.flow.state_dict()), 0
            else:
                stale += 1
                if stale >= self.patience:
                    break
        self.flow.load_state_dict(best_state)
        return self

    @torch.no_grad()
    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        """Log-likelihood of each row under the flow."""
        self._check_fitted()
        x = self._check_dim(features, self.features).to(self.shift.device, torch.float32)
        self.flow.eval()
        return torch.cat([self._log_prob(chunk) for chunk in x.split(8192)])


DENSITIES.add("flow", NormalizingFlow.from_settings)
DENSITIES.add("flow-nsf", partial(NormalizingFlow.from_settings, architecture="nsf"))
