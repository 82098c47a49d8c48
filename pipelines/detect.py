"""Stage: flag inputs with a calibrated detector (``synthkd detect``).

Loads the detector directory (with its copy of the classifier, or checked against a given one),
reads the inputs (a dataset spec, an image folder or a synthetic set), and gives per input its
score, conformal p-value, flag (p < alpha) and predicted class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from synthkd.accelerator import make_accelerator
from synthkd.detector import Detector
from synthkd.detector.features import extract
from synthkd.detector.settings import DetectSettings
from synthkd.models import Classifier

from .calibrate import open_inputs

__all__ = ["DetectSettings", "Detection", "detect"]


@dataclass
class Detection:
    """Per input (in the order read): score, p-value, flag and predicted class index."""

    scores: torch.Tensor
    p_values: torch.Tensor
    flagged: torch.Tensor
    predictions: torch.Tensor
    alpha: float
    class_names: list[str] | None = None

    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names else str(index)

    def rows(self) -> list[dict[str, Any]]:
        """One record per input, as ``synthkd detect --json`` prints them."""
        return [{"index": index, "score": score, "p_value": p_value, "flagged": flagged, "predicted": predicted,
                 "predicted_class": self.class_name(predicted)}
                for index, (score, p_value, flagged, predicted) in enumerate(zip(
                    self.scores.tolist(), self.p_values.tolist(), self.flagged.tolist(), self.predictions.tolist()))]


def detect(detector_dir: str | Path, inputs: str | Path, settings: DetectSettings | None = None,
           model: Classifier | None = None, accelerator: Accelerator | None = None) -> Detection:
    """Score every input of ``inputs`` with the detector in ``detector_dir`` and flag those whose
    p-value is below ``settings.alpha`` (default: the detector's). With ``model``, the detector
    must have been fitted on it (fingerprints match) and it scores with that model."""
    settings = settings or DetectSettings()
    settings.check()
    detector = Detector.from_pretrained(detector_dir, model)
    alpha = detector.alpha if settings.alpha is None else settings.alpha
    accelerator = accelerator or make_accelerator()
    detector.to(accelerator.device)
    data = extract(detector.model, open_inputs(inputs), accelerator, detector.layer, settings.batch_size,
                   detector.batchnorm)
    scores = detector.score_features(data.features, data.deviations)
    p_values = detector.p_values(scores)
    return Detection(scores, p_values, p_values < alpha, data.predictions, alpha, detector.model.config.class_names)
