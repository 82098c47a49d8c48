"""The failure detector: a classifier, a density model of its features, and conformal calibration.

The score is the density's log-likelihood of the features. With a ``batchnorm_weight`` above 0
it also weighs in how far the input's channel means at some BatchNorm layers lie from the
statistics the network stored while training (:func:`~synthkd.detector.features.batchnorm_deviation`):
score = z(log-likelihood) + weight * z(-mean deviation), each term standardised by its mean and
std on the fitting features. The stored statistics come from the real training data, for free;
they help most against adversarial inputs, which the synthetic-fitted density misses.

Saved as a directory: ``detector.json`` (layer, BatchNorm layers and weight, alpha, the model's
fingerprint, where it was calibrated), ``detector.safetensors`` (feature mean/std, the two terms'
mean/std and the held-out calibration scores),
``density/`` (the density model), ``baselines/`` (Mahalanobis and kNN fitted on the same
features, for evaluation) and ``model/`` (a copy of the classifier, so ``synthkd detect`` needs
only the detector directory). A detector used with another model than the one it was fitted on
is refused: the fingerprints must match.

What it flags by is its ``score``: one part of :data:`~synthkd.detector.parts.PARTS` (``density``
by default, or the classifier's confidence, ...) or a rule of
:data:`~synthkd.detector.combinations.COMBINATIONS` over several ``parts`` (e.g. Fisher's rule over
the density's and MSP's p-values). Every part's score on the held-out inputs is kept
(``calibration_parts``), so another score can be picked after calibration (``synthkd detect
--score``). For a single part the whole held-out set calibrates its p-values; for a rule, the
first half is the reference the parts' p-values are taken against and the second half calibrates
the combined score, so the final p-value is valid whatever the dependence between the parts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..errors import SynthkdError
from ..io import atomic_write, atomic_write_json, inside, read_json, read_safetensors
from ..models import Classifier
from .combinations import COMBINATIONS, combine
from .conformal import check_alpha, conformal_p_values, interpolated_p_values
from .density import FeatureScorer
from .features import Features, features_of_batch
from .parts import PARTS

CONFIG_NAME = "detector.json"
TENSORS_NAME = "detector.safetensors"
FORMAT = "synthkd-detector"
VERSION = 1


def batchnorm_weight_problem(weight: float) -> str | None:
    """The BatchNorm term's weight: 0 turns the term off, a positive weight weighs it in."""
    return None if weight >= 0 else f"expected 0 (off) or a positive weight, got {weight:g}"


def check_batchnorm_weight(weight: float) -> float:
    problem = batchnorm_weight_problem(weight)
    if problem:
        raise SynthkdError(f"batchnorm_weight {problem}")
    return float(weight)


def score_names() -> list[str]:
    """What a detector can flag by: a part alone, or a combination rule over parts."""
    return [*PARTS.names(), *COMBINATIONS.names()]


def score_problem(score: str) -> str | None:
    if score in PARTS or score in COMBINATIONS:
        return None
    return f"names no score part or combination rule ({score!r}); use one of {', '.join(score_names())}"


def parts_problem(parts: Sequence[str]) -> str | None:
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        return f"names an unknown score part {unknown[0]!r}; use some of {', '.join(PARTS.names())}"
    if len(set(parts)) < 2 or len(set(parts)) != len(parts):
        return f"must name at least two different score parts for a combination rule, got {', '.join(parts) or 'none'}"
    return None


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
        batchnorm: Sequence[str] = (),
        batchnorm_weight: float = 0.0,
        term_stats: torch.Tensor | None = None,
        score: str = "density",
        parts: Sequence[str] = ("density", "msp"),
        component_classes: torch.Tensor | None = None,
        calibration_parts: dict[str, torch.Tensor] | None = None,
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
        self.batchnorm_weight = check_batchnorm_weight(batchnorm_weight)
        if self.batchnorm_weight > 0 and not batchnorm:
            raise SynthkdError("a batchnorm_weight above 0 needs BatchNorm layers to read; name them with --batchnorm-layers")
        self.batchnorm = list(batchnorm)
        self.term_stats = term_stats  # mean and std of the density term, then of the BatchNorm term
        self.component_classes = component_classes  # log P(class | mixture component), K x C
        self.calibration_parts = dict(calibration_parts or {})  # every computable part on the held-out inputs
        self.score_name, self.parts = "density", ["density", "msp"]
        self.check_score(score, parts)
        self.score_name, self.parts = score, list(parts)

    # ------------------------------------------------------------------ scores
    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        """What the density sees: the feature's direction (unit length, with ``normalize``), standardised
        by the fitting mean/std. Directions transfer from synthetic to real inputs much better than raw
        features, whose length differs between the two (see the README's detector figures)."""
        features = F.normalize(features.float(), dim=1) if self.normalize else features.float()
        return (features - self.feature_mean.to(features.device)) / self.feature_std.to(features.device)

    def density_term(self, features: torch.Tensor) -> torch.Tensor:
        return self.density.score_features(self.standardize(features)).cpu()

    @staticmethod
    def batchnorm_term(deviations: torch.Tensor) -> torch.Tensor:
        """Higher = closer to the training statistics."""
        return -deviations.float().mean(1).cpu()

    def batchnorm_score(self, deviations: torch.Tensor | None) -> torch.Tensor:
        """The BatchNorm term of inputs' deviations at this detector's BatchNorm layers."""
        return self.batchnorm_term(self._deviations(deviations))

    def fit_terms(self, fitting: Features) -> None:
        """Mean and std of both terms on the fitting features, which put them on one scale."""
        if self.batchnorm_weight == 0:
            return
        terms = (self.density_term(fitting.features), self.batchnorm_term(self._deviations(fitting.deviations)))
        self.term_stats = torch.stack([torch.stack([t.mean(), t.std().clamp_min(1e-12)]) for t in terms]).flatten()

    def score_features(self, features: torch.Tensor, deviations: torch.Tensor | None = None) -> torch.Tensor:
        """Score of raw features of this model's layer, and of the BatchNorm deviations when the
        detector weighs them."""
        density = self.density_term(features)
        if self.batchnorm_weight == 0:
            return density
        if self.term_stats is None:
            raise SynthkdError("this detector weighs BatchNorm deviations but was not fitted (fit_terms); calibrate it again")
        mean, std, bn_mean, bn_std = self.term_stats.tolist()
        typicality = self.batchnorm_term(self._deviations(deviations))
        return (density - mean) / std + self.batchnorm_weight * (typicality - bn_mean) / bn_std

    def _deviations(self, deviations: torch.Tensor | None) -> torch.Tensor:
        if deviations is None or deviations.ndim != 2 or deviations.shape[1] != len(self.batchnorm):
            got = "none" if deviations is None else f"shape {tuple(deviations.shape)}"
            raise SynthkdError(f"this detector needs the deviations at its {len(self.batchnorm)} BatchNorm layers, got "
                               f"{got}; extract features with batchnorm=detector.batchnorm")
        return deviations

    # ------------------------------------------------------------------ parts and combinations
    def available_parts(self) -> list[str]:
        """The parts this detector can compute."""
        return [name for name in PARTS.names() if PARTS.get(name).needs(self) is None]

    def check_score(self, score: str | None = None, parts: Sequence[str] | None = None) -> tuple[str, list[str]]:
        """(score, parts), defaults filled in from the detector's own; refused with the fix when a
        name is unknown or a needed part cannot be computed by this detector."""
        score = self.score_name if score is None else score
        parts = list(self.parts if parts is None else parts)
        for problem in (score_problem(score), parts_problem(parts) if score in COMBINATIONS else None):
            if problem:
                raise SynthkdError(f"score {problem}" if problem.startswith("names no") else f"parts {problem}")
        for part in parts if score in COMBINATIONS else [score]:
            missing = PARTS.get(part).needs(self)
            if missing:
                raise SynthkdError(f"score part {part!r} needs {missing}")
            if self.calibration_parts and part not in self.calibration_parts:
                raise SynthkdError(f"the detector was calibrated without the score part {part!r}; calibrate it again")
        return score, parts

    def part_scores(self, data: Features, parts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {part: PARTS.get(part).compute(self, data).float().cpu() for part in parts}

    def reference_and_calibration(self, score: str, parts: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(reference part scores, calibration scores of ``score``) from the held-out part scores
        (see the module docstring)."""
        if not self.calibration_parts:
            if score != "density" or self.calibration_scores is None:
                raise SynthkdError("this detector holds only its density's calibration scores; calibrate it again "
                                   "to flag by another score")
            return {}, self.calibration_scores
        if score in PARTS:
            return {}, self.calibration_parts[score]
        held_out = len(next(iter(self.calibration_parts.values())))
        if held_out < 4:
            raise SynthkdError(f"a combination rule needs at least 4 held-out inputs, the detector has {held_out}; "
                               "calibrate on more data or a larger --holdout")
        half = held_out // 2
        reference = {part: self.calibration_parts[part][:half] for part in parts}
        calibration = {part: self.calibration_parts[part][half:] for part in parts}
        return reference, combine(score, self._part_p_values(calibration, reference, parts))

    @staticmethod
    def _part_p_values(scores: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                       parts: Sequence[str]) -> torch.Tensor:
        return torch.stack([interpolated_p_values(scores[part], reference[part]) for part in parts], 1)

    def explain(self, data: Features, score: str | None = None, parts: Sequence[str] | None = None,
                alpha: float | None = None) -> dict[str, Any]:
        """Per input: the score, its p-value, the flag, and for a combination rule each part's
        p-value against the reference inputs (why an input was flagged)."""
        score, parts = self.check_score(score, parts)
        return self.explain_parts(self.part_scores(data, parts if score in COMBINATIONS else [score]), score, parts, alpha)

    def explain_parts(self, part_scores: dict[str, torch.Tensor], score: str, parts: Sequence[str],
                      alpha: float | None = None) -> dict[str, Any]:
        """:meth:`explain` from the parts' scores of the inputs."""
        alpha = check_alpha(self.alpha if alpha is None else alpha)
        reference, calibration = self.reference_and_calibration(score, parts)
        explanation: dict[str, Any] = {"score_name": score}
        if score in PARTS:
            scores = part_scores[score]
        else:
            part_p_values = self._part_p_values(part_scores, reference, parts)
            scores = combine(score, part_p_values)
            explanation["part_p_values"] = dict(zip(parts, part_p_values.T))
        p_values = conformal_p_values(scores, calibration)
        return {**explanation, "scores": scores, "p_values": p_values, "flagged": p_values < alpha}

    def scores(self, data: Features, score: str | None = None, parts: Sequence[str] | None = None) -> torch.Tensor:
        """Scores of ``score`` (default: the detector's) on features, logits and deviations."""
        return self.explain(data, score, parts)["scores"]

    def calibrate_parts(self, held_out: Features) -> None:
        """Keep every computable part's scores on the held-out inputs, and the calibration scores
        of the detector's own score."""
        self.calibration_parts = self.part_scores(held_out, self.available_parts())
        self.check_score()
        self.calibration_scores = self.reference_and_calibration(self.score_name, self.parts)[1].clone()

    def features(self, images: torch.Tensor) -> Features:
        device = next(self.model.parameters()).device
        data = features_of_batch(self.model, images.to(device), self.layer, self.batchnorm)
        return Features(data.features.cpu(), data.logits.cpu(), data.labels.cpu(), data.deviations.cpu())

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """Scores (the detector's score) of a batch of [0,1] images N x C x H x W."""
        return self.scores(self.features(images))

    def p_values(self, scores: torch.Tensor) -> torch.Tensor:
        """Conformal p-values of scores against the held-out calibration scores."""
        if self.calibration_scores is None:
            raise SynthkdError("this detector has no calibration scores; calibrate it with `synthkd calibrate`")
        return conformal_p_values(scores, self.calibration_scores)

    def predict(self, images: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
        """True where an input is flagged: p-value below alpha (the detector's alpha by default)."""
        return self.explain(self.features(images), alpha=alpha)["flagged"]

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
        if self.term_stats is not None:
            tensors["term_stats"] = self.term_stats.float().cpu().contiguous()
        if self.component_classes is not None:
            tensors["component_classes"] = self.component_classes.float().cpu().contiguous()
        for part, scores in self.calibration_parts.items():
            tensors[f"calibration_part.{part}"] = scores.float().cpu().contiguous()
        atomic_write(directory / TENSORS_NAME, lambda tmp: save_file(tensors, tmp))
        atomic_write_json(directory / CONFIG_NAME, {
            "format": FORMAT, "version": VERSION, "density": self.density.kind, "layer": self.layer,
            "alpha": self.alpha, "model_fingerprint": self.model_fingerprint, "normalize": self.normalize,
            "batchnorm": self.batchnorm, "batchnorm_weight": self.batchnorm_weight,
            "baselines": sorted(self.baselines), "score": self.score_name, "parts": self.parts, **self.info,
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
        tensors = read_safetensors(directory / TENSORS_NAME, "re-run `synthkd calibrate`")
        stored = Classifier.from_pretrained(directory / "model")
        arguments = {name: config.pop(name) for name in ("layer", "alpha", "normalize", "model_fingerprint")}
        baselines = {name: FeatureScorer.from_pretrained(inside(directory / "baselines", name, f"{CONFIG_NAME}'s baselines"))
                     for name in config.pop("baselines", [])}
        detector = cls(
            model=stored,
            density=FeatureScorer.from_pretrained(directory / "density"),
            feature_mean=tensors["feature_mean"],
            feature_std=tensors["feature_std"],
            calibration_scores=tensors.get("calibration_scores"),
            baselines=baselines,
            batchnorm=config.pop("batchnorm", []),  # absent in detectors from before the BatchNorm term
            batchnorm_weight=float(config.pop("batchnorm_weight", 0.0)),
            term_stats=tensors.get("term_stats"),
            score=config.pop("score", "density"),  # absent in detectors from before the combined scores
            parts=config.pop("parts", ["density", "msp"]),
            component_classes=tensors.get("component_classes"),
            calibration_parts={name.split(".", 1)[1]: value for name, value in tensors.items()
                               if name.startswith("calibration_part.")},
            info={k: v for k, v in config.items() if k not in ("format", "version", "density")},
            **arguments,
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
