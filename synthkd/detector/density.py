"""One interface for every feature scorer (density models and the distance baselines), scoring
by the convention stated in :mod:`synthkd.detector`.

Like pytorch-ood's detectors: ``fit_features(features)`` / ``score_features(features)`` work on
feature matrices; ``fit(model, dataset)`` / ``score(model, images)`` take the features of a
classifier first. A scorer is an ``nn.Module`` (its state moves with ``.to(device)``) and saves
as a directory: ``config.json`` (kind and arguments) + ``model.safetensors`` (its tensors).
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from ..errors import SynthkdError
from ..io import atomic_write, atomic_write_json, read_json, read_safetensors
from ..models import Classifier
from ..registry import Registry
from .features import check_finite, extract, features_of_batch, resolve_layer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _import_scorers() -> None:
    """The modules defining the built-in scorers, imported by name (they import this one)."""
    importlib.import_module("synthkd.detector.baselines")
    importlib.import_module("synthkd.detector.densities").DENSITIES.names()


SCORERS: Registry[type["FeatureScorer"]] = Registry("scorer", loader=_import_scorers)


class FeatureScorer(nn.Module, ABC):
    """Scores feature vectors. Subclasses set ``kind`` (the name a saved scorer is loaded by: every
    subclass registers itself in :data:`SCORERS`) and implement ``fit_features``,
    ``score_features``, ``get_config`` and ``load_tensors``."""

    kind: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            SCORERS.add(cls.kind, cls)

    @abstractmethod
    def fit_features(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> "FeatureScorer":
        """Fit on a matrix N x D (``labels``: predicted classes, used by class-conditional scorers only)."""

    @abstractmethod
    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        """One score per row."""

    @abstractmethod
    def get_config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable."""

    @abstractmethod
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the fitted state from the tensors ``state_dict()`` saved."""

    @property
    def fitted(self) -> bool:
        return len(self.state_dict()) > 0

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise SynthkdError(f"this {self.kind} scorer is not fitted; call fit or fit_features first")

    def _check_dim(self, features: torch.Tensor, dim: int) -> torch.Tensor:
        check_finite(features)
        if features.shape[1] != dim:
            raise SynthkdError(f"the {self.kind} scorer was fitted on {dim}-dimensional features, got {features.shape[1]}")
        return features

    def fit(self, model: Classifier, dataset: Dataset, accelerator: Accelerator, layer: str | None = None) -> "FeatureScorer":
        data = extract(model, dataset, accelerator, resolve_layer(model, layer))
        return self.fit_features(data.features.to(accelerator.device), data.logits.argmax(1).to(accelerator.device))

    def score(self, model: Classifier, images: torch.Tensor, layer: str | None = None) -> torch.Tensor:
        return self.score_features(features_of_batch(model.eval(), images, resolve_layer(model, layer)).features)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self._check_fitted()
        directory = Path(directory)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp))
        atomic_write_json(directory / CONFIG_NAME, {"kind": self.kind, **self.get_config()})

    @staticmethod
    def from_pretrained(directory: str | os.PathLike) -> "FeatureScorer":
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
            raise SynthkdError(f"{directory} is not a saved scorer (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        config = dict(read_json(directory / CONFIG_NAME))
        kind = config.pop("kind", None)
        if kind not in SCORERS:
            raise SynthkdError(f"{directory / CONFIG_NAME} names an unknown scorer {kind!r}; known: {', '.join(SCORERS)}")
        scorer = SCORERS.get(kind)(**config)
        scorer.load_tensors(read_safetensors(directory / WEIGHTS_NAME, "re-run `synthkd calibrate`"))
        return scorer
