"""Stage: calibrate a failure detector for a classifier, on synthetic samples or any data set.

The features of the data are split once (seeded): the density model is fitted on one part,
and the other part (``holdout``) gives the calibration scores behind the conformal p-values.
No class labels are used; the baselines saved beside it (:data:`synthkd.detector.BASELINES`) are
fitted on the same features (Mahalanobis on the classifier's predicted labels). With
``batchnorm_weight`` the detector also weighs the inputs' deviations from the network's
BatchNorm statistics (:mod:`synthkd.detector.detector`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator
from torch.utils.data import Dataset

from synthkd.accelerator import make_accelerator
from synthkd.data import load_dataset
from synthkd.data.reader import SyntheticDataset, is_synthetic_dir
from synthkd.detector import BASELINES, Detector, Features, build_density
from synthkd.detector.features import cached_extract, features_cache_dir, resolve_batchnorm_layers, resolve_layer
from synthkd.detector.settings import CalibrationSettings
from synthkd.errors import SynthkdError
from synthkd.models import Classifier

__all__ = ["CalibrationSettings", "Detector", "calibrate", "open_inputs"]


def open_inputs(data: str | os.PathLike) -> Dataset:
    """A synthetic set directory, a plain image folder, or any dataset spec."""
    path = Path(data)
    if is_synthetic_dir(path):
        return SyntheticDataset(path)
    if path.is_dir():
        return load_dataset(f"folder:{path}")
    return load_dataset(str(data))


def calibrate(
    model: Classifier,
    data: str | Path,
    out: str | Path,
    settings: CalibrationSettings | None = None,
    *,
    seed: int = 0,
    batchnorm_layers: Sequence[str] | None = None,
    accelerator: Accelerator | None = None,
) -> Detector:
    """Fit the density of ``model``'s features on ``data``, keep held-out calibration scores, and
    write the detector directory ``out``. Features are cached under ``out/features`` (or
    ``$SYNTHKD_FEATURE_CACHE``), so a rerun does not extract them again. ``batchnorm_layers``
    name the BatchNorm modules of the BatchNorm term (default: the middle half)."""
    settings = settings or CalibrationSettings()
    settings.check()  # before the features are extracted
    if batchnorm_layers and settings.batchnorm_weight == 0:
        raise SynthkdError("BatchNorm layers were given but the BatchNorm term's weight is 0 (off); "
                           "give a positive --batchnorm-weight, or leave the layers out")
    accelerator = accelerator or make_accelerator()
    layer = resolve_layer(model, settings.layer)
    batchnorm = resolve_batchnorm_layers(model, batchnorm_layers) if settings.batchnorm_weight > 0 else []
    features = cached_extract(model, open_inputs(data), accelerator, layer, features_cache_dir(Path(out) / "features"),
                              batchnorm=batchnorm)
    fit_part, calibration_part = split(features, settings.holdout, seed, data)
    detector = fit_detector(model, fit_part, layer, batchnorm, settings, seed, accelerator.device)
    detector.calibration_scores = detector.score_features(calibration_part.features.to(accelerator.device),
                                                          calibration_part.deviations)
    detector.info.update(data=str(data), num_calibration=len(calibration_part))
    if accelerator.is_main_process:
        detector.save_pretrained(out)
    accelerator.wait_for_everyone()
    return detector


def split(features: Features, holdout: float, seed: int, data: str | Path) -> tuple[Features, Features]:
    """(fitting part, calibration part): a seeded split keeping ``holdout`` for calibration."""
    num_calibration = round(holdout * len(features))
    if num_calibration < 1 or len(features) - num_calibration < 2:
        raise SynthkdError(
            f"{data} gives {len(features)} inputs: too few to fit on {1 - holdout:.0%} and calibrate on "
            f"{holdout:.0%}; use more data or another --holdout"
        )
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))
    return features.select(order[num_calibration:]), features.select(order[:num_calibration])


def fit_detector(model: Classifier, fit_part: Features, layer: str, batchnorm: Sequence[str],
                 settings: CalibrationSettings, seed: int, device: torch.device) -> Detector:
    """A detector whose density (and baselines) are fitted on ``fit_part``, not yet calibrated."""
    directions = torch.nn.functional.normalize(fit_part.features, dim=1)  # the detector models directions
    mean, std = directions.mean(0), directions.std(0)
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))  # constant features stay finite
    density = build_density(settings, seed)
    started = time.perf_counter()
    density.fit_features(((directions - mean) / std).to(device))
    fit_seconds = time.perf_counter() - started
    baselines = {name: BASELINES.get(name)().fit_features(fit_part.features.to(device), fit_part.predictions.to(device))
                 for name in BASELINES.names()}
    info = {"holdout": settings.holdout, "seed": seed, "num_fit": len(fit_part), "feature_dim": int(mean.numel()),
            "fit_seconds": fit_seconds}
    detector = Detector(model, density, layer, mean, std, None, settings.alpha, baselines, info, normalize=True,
                        batchnorm=batchnorm, batchnorm_weight=settings.batchnorm_weight)
    detector.fit_terms(fit_part)
    return detector
