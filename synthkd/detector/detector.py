"""The failure detector: a classifier, a density model of its features, and conformal calibration.

Saved as a directory: ``detector.json`` (layer, alpha, the model's fingerprint, where it was
calibrated), ``detector.safetensors`` (feature mean/std and the held-out calibration scores),
``density/`` (the density model), ``baselines/`` (Mahalanobis and kNN fitted on the same
features, for evaluation) and ``model/`` (a copy of the classifier, so ``synthkd detect`` needs
only the detector directory). A detector used with another model than the one it was fitted on
is refused: the fingerprints must match.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..errors import SynthkdError
from ..io import atomic_write, atomic_write_json, read_json
from ..models import Classifier
from .conformal import check_alpha, conformal_p_values
from .density import FeatureScorer
from .features import Features, features_of_batch

CONFIG_NAME = "detector.json"
TENSORS_NAME = "detector.safetensors"
FORMAT = "synthkd-detector"
VERSION = 1


class Detector:
    """Flags inputs whose features are atypical: p-value of the density score below alpha."""

    def __init__(
        self,
        model: Classifier,
        density: FeatureScorer,
        layer: str,
        feature_mean: torch.Tensor,
        feature_std: torch.Tensor,
        calibration_scores: torch.Tensor | None = None,
        alpha: float = 0.05,
        baselines: dict[str, FeatureScorer] | None = None,
        info: dict[str, Any] | None = None,
        model_fingerprint: str | None = None,
        normalize: bool = True,
    ):
        self.model = model.eval()
        self.density = density
        self.layer = layer
        self.feature_mean = feature_mean.float().cpu()
        self.feature_std = feature_std.float().cpu()
        self.calibration_scores = calibration_scores
        self.alpha = check_alpha(alpha)
        self.baselines = dict(baselines or {})
        self.info = dict(info or {})
        self.model_fingerprint = model_fingerprint or model.fingerprint()
        self.normalize = normalize

    # ------------------------------------------------------------------ scores
    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        """What the density sees: the feature's direction (unit length, with ``normalize``), standardised
        by the fitting mean/std. Directions transfer from synthetic to real inputs much better than raw
        features, whose length differs between the two (see the README's detector figures)."""
        features = F.normalize(features.float(), dim=1) if self.normalize else features.float()
        return (features - self.feature_mean.to(features.device)) / self.feature_std.to(features.device)

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        """Density score of raw features of this model's layer (higher = more typical)."""
        return self.density.score_features(self.standardize(features)).cpu()

    def features(self, images: torch.Tensor) -> Features:
        device = next(self.model.parameters()).device
        features, logits = features_of_batch(self.model, images.to(device), self.layer)
        return Features(features.cpu(), logits.cpu(), torch.full((len(images),), -1))

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """Scores of a batch of [0,1] images N x C x H x W (higher = more typical)."""
        return self.score_features(self.features(images).features)

    def p_values(self, scores: torch.Tensor) -> torch.Tensor:
        """Conformal p-values of scores against the held-out calibration scores."""
        if self.calibration_scores is None:
            raise SynthkdError("this detector has no calibration scores; calibrate it with `synthkd calibrate`")
        return conformal_p_values(scores, self.calibration_scores)

    def predict(self, images: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
        """True where an input is flagged: p-value below alpha (the detector's alpha by default)."""
        return self.p_values(self.score(images)) < check_alpha(self.alpha if alpha is None else alpha)

    def threshold(self, alpha: float | None = None) -> float:
        """The score below which inputs are flagged at ``alpha`` (for plots)."""
        alpha = check_alpha(self.alpha if alpha is None else alpha)
        calibration = self.calibration_scores.double().sort().values
        p = (1 + torch.arange(1, len(calibration) + 1)) / (len(calibration) + 1)
        below = calibration[p < alpha]
        return float(below[-1]) if len(below) else float(calibration[0]) - 1.0

    # ------------------------------------------------------------------ model binding
    def check_model(self, model: Classifier) -> None:
        fingerprint = model.fingerprint()
        if fingerprint != self.model_fingerprint:
            raise SynthkdError(
                f"the detector was fitted on the model with fingerprint {self.model_fingerprint}, but this model's "
                f"fingerprint is {fingerprint}; calibrate a detector for this model with `synthkd calibrate`"
            )

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        self.model.save_pretrained(directory / "model")
        self.density.save_pretrained(directory / "density")
        for name, scorer in self.baselines.items():
            scorer.save_pretrained(directory / "baselines" / name)
        tensors = {"feature_mean": self.feature_mean.contiguous(), "feature_std": self.feature_std.contiguous()}
        if self.calibration_scores is not None:
            tensors["calibration_scores"] = self.calibration_scores.float().cpu().contiguous()
        atomic_write(directory / TENSORS_NAME, lambda tmp: save_file(tensors, tmp))
        atomic_write_json(directory / CONFIG_NAME, {
            "format": FORMAT, "version": VERSION, "density": self.density.kind, "layer": self.layer,
            "alpha": self.alpha, "model_fingerprint": self.model_fingerprint, "normalize": self.normalize,
            "baselines": sorted(self.baselines), **self.info,
        })

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model: Classifier | None = None) -> "Detector":
        """Load a detector directory; with ``model``, check that it is the model the detector was fitted on."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() or not (directory / TENSORS_NAME).is_file():
            raise SynthkdError(
                f"{directory} is not a detector directory (needs {CONFIG_NAME} and {TENSORS_NAME}); "
                "make one with `synthkd calibrate --model M --data DATA --out DIR`"
            )
        config = dict(read_json(directory / CONFIG_NAME))
        if config.get("format") != FORMAT or config.get("version") != VERSION:
            raise SynthkdError(f"{directory / CONFIG_NAME} is not a version-{VERSION} synthkd detector; re-run `synthkd calibrate`")
        tensors = load_file(str(directory / TENSORS_NAME))
        fingerprint = config.pop("model_fingerprint")
        stored = Classifier.from_pretrained(directory / "model")
        detector = cls(
            model=stored,
            density=FeatureScorer.from_pretrained(directory / "density"),
            layer=config.pop("layer"),
            feature_mean=tensors["feature_mean"],
            feature_std=tensors["feature_std"],
            calibration_scores=tensors.get("calibration_scores"),
            alpha=config.pop("alpha"),
            baselines={name: FeatureScorer.from_pretrained(directory / "baselines" / name) for name in config.pop("baselines", [])},
            info={k: v for k, v in config.items() if k not in ("format", "version", "density")},
            model_fingerprint=fingerprint,
            normalize=bool(config.pop("normalize")),
        )
        detector.check_model(stored)  # the stored copy itself must be intact
        if model is not None:
            detector.check_model(model)
            detector.model = model.eval()
        return detector

    def to(self, device: torch.device | str) -> "Detector":
        self.model.to(device)
        self.density.to(device)
        for scorer in self.baselines.values():
            scorer.to(device)
        return self
