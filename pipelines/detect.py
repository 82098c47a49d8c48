"""Stage: flag inputs with a calibrated detector (``synthkd detect``).

Loads the detector directory (with its copy of the classifier, or checked against a given one),
reads the inputs (a dataset spec, an image folder or a synthetic set), and gives per input its
score, conformal p-value, flag (p < alpha) and predicted class; when the score is a combination
rule, also each part's p-value (why an input was flagged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    """Per input (in the order read): score, p-value, flag and predicted class index; for a
    combination rule, each part's p-value against the detector's reference inputs."""

    scores: torch.Tensor
    p_values: torch.Tensor
    flagged: torch.Tensor
    predictions: torch.Tensor
    alpha: float
    class_names: list[str] | None = None
    score_name: str = "density"
    part_p_values: dict[str, torch.Tensor] = field(default_factory=dict)

    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names else str(index)

    def rows(self) -> list[dict[str, Any]]:
        """One record per input, as ``synthkd detect --json`` prints them."""
        parts = {name: values.tolist() for name, values in self.part_p_values.items()}
        rows = [{"index": index, "score": score, "p_value": p_value, "flagged": flagged, "predicted": predicted,
                 "predicted_class": self.class_name(predicted)}
                for index, (score, p_value, flagged, predicted) in enumerate(zip(
                    self.scores.tolist(), self.p_values.tolist(), self.flagged.tolist(), self.predictions.tolist()))]
        for row in rows:
            row["score_name"] = self.score_name
            if parts:
                row["part_p_values"] = {name: values[row["index"]] for name, values in parts.items()}
        return rows


def detect(detector_dir: str | Path, inputs: str | Path, settings: DetectSettings | None = None,
           model: Classifier | None = None, accelerator: Accelerator | None = None) -> Detection:
    """Score every input of ``inputs`` with the detector in ``detector_dir`` and flag those whose
    p-value is below ``settings.alpha`` (default: the detector's). With ``model``, the detector
    must have been fitted on it (fingerprints match) and it scores with that model."""
    settings = settings or DetectSettings()
    settings.check()
    detector = Detector.from_pretrained(detector_dir, model)
    detector.check_score(settings.score, settings.parts)  # before the inputs are read
    alpha = detector.alpha if settings.alpha is None else settings.alpha
    accelerator = accelerator or make_accelerator()
    detector.to(accelerator.device)
    data = extract(detector.model, open_inputs(inputs), accelerator, detector.layer, settings.batch_size,
                   detector.batchnorm)
    explained = detector.explain(data, settings.score, settings.parts, alpha)
    return Detection(explained["scores"], explained["p_values"], explained["flagged"], data.predictions, alpha,
                     detector.model.config.class_names, explained["score_name"], explained.get("part_p_values", {}))
