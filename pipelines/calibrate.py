"""Stage: calibrate a failure detector for a classifier, on synthetic samples or any data set.

The features of the data are split once (seeded): the density model is fitted on one part,
and the other part (``holdout``) gives the calibration scores behind the conformal p-values.
No class labels are used; the baselines saved beside it (:data:`synthkd.detector.BASELINES`) are
fitted on the same features (Mahalanobis on the classifier's predicted labels). With
``batchnorm_weight`` the detector also weighs the inputs' deviations from the network's
BatchNorm statistics (:mod:`synthkd.detector.detector`).

Every part the detector can compute (:data:`synthkd.detector.parts.PARTS`) is scored on the
held-out inputs, so its ``score`` (a part, or a combination rule over parts) can be changed later.
With ``calibration_views`` other than ``plain`` the held-out images are replaced by perturbed views
(pad-and-crop, MixUp with another held-out image) before they are scored: synthetic images score
as more typical than real ones, and their perturbed views less so, which narrows the gap between
the false-alarm rate on real inputs and alpha (measured in benchmarks/detector_fashion_mnist.py).
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
from synthkd.augment import training_augmentation
from synthkd.data import LabelledTensors, load_dataset
from synthkd.data.reader import SyntheticDataset, is_synthetic_dir
from synthkd.detector import BASELINES, Detector, Features, GaussianMixture, build_density
from synthkd.detector.features import (
    cached_extract, extract, features_cache_dir, resolve_batchnorm_layers, resolve_layer,
)
from synthkd.detector.parts import component_classes
from synthkd.detector.settings import CalibrationSettings
from synthkd.errors import SynthkdError
from synthkd.models import Classifier
from synthkd.seeds import derive_seed

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
    dataset = open_inputs(data)
    features = cached_extract(model, dataset, accelerator, layer, features_cache_dir(Path(out) / "features"),
                              batchnorm=batchnorm)
    fit_index, calibration_index = split(len(features), settings.holdout, seed, data)
    fit_part, calibration_part = features.select(fit_index), features.select(calibration_index)
    detector = fit_detector(model, fit_part, layer, batchnorm, settings, seed, accelerator.device)
    if settings.calibration_views != "plain":
        views = perturbed_views(dataset, calibration_index, settings.calibration_views, seed)
        calibration_part = extract(model, views, accelerator, layer, batchnorm=batchnorm)
    detector.calibrate_parts(calibration_part)
    detector.info.update(data=str(data), num_calibration=len(calibration_part),
                         calibration_views=settings.calibration_views)
    if accelerator.is_main_process:
        detector.save_pretrained(out)
    accelerator.wait_for_everyone()
    return detector


def split(num_inputs: int, holdout: float, seed: int, data: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(fitting indices, calibration indices): a seeded split keeping ``holdout`` for calibration."""
    num_calibration = round(holdout * num_inputs)
    if num_calibration < 1 or num_inputs - num_calibration < 2:
        raise SynthkdError(
            f"{data} gives {num_inputs} inputs: too few to fit on {1 - holdout:.0%} and calibrate on "
            f"{holdout:.0%}; use more data or another --holdout"
        )
    order = torch.randperm(num_inputs, generator=torch.Generator().manual_seed(seed))
    return order[num_calibration:], order[:num_calibration]


def perturbed_views(dataset: Dataset, index: torch.Tensor, views: str, seed: int) -> LabelledTensors:
    """One perturbed view of each indexed image (see ``CalibrationSettings.calibration_views``):
    pad-and-crop (no flip: not every set is mirror-symmetric) and/or a MixUp with another of
    them, the partner weighing at most half."""
    images = torch.stack([torch.as_tensor(dataset[int(i)].images).float() for i in index])
    generator = torch.Generator().manual_seed(derive_seed(seed, "calibration views"))
    if "crop" in views:
        torch.manual_seed(derive_seed(seed, "calibration crops"))  # kornia draws from the global generator
        images = training_augmentation(*images.shape[-2:], flip=False)(images)
    if "mixup" in views:
        weight = 0.5 + 0.5 * torch.rand(len(images), 1, 1, 1, generator=generator)
        partner = images[torch.randperm(len(images), generator=generator)]
        images = weight * images + (1 - weight) * partner
    return LabelledTensors(images.clamp(0, 1), torch.full((len(images),), -1, dtype=torch.long))


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
    classes = (component_classes(density, ((directions - mean) / std).to(device), fit_part.predictions,
                                 fit_part.logits.shape[1])
               if isinstance(density, GaussianMixture) else None)
    detector = Detector(model, density, layer, mean, std, None, settings.alpha, baselines, info, normalize=True,
                        batchnorm=batchnorm, batchnorm_weight=settings.batchnorm_weight, score=settings.score,
                        parts=settings.parts, component_classes=classes)
    detector.fit_terms(fit_part)
    return detector
