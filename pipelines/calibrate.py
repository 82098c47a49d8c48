"""Stage: calibrate a failure detector for a classifier, on synthetic samples or any data set.

The features of the data are split once (seeded): the density model is fitted on one part,
and the other part (``holdout``) gives the calibration scores behind the conformal p-values.
No class labels are used; the Mahalanobis and kNN baselines saved beside it are fitted on the
same features (Mahalanobis on the classifier's predicted labels). With ``batchnorm_weight`` the
detector also weighs the inputs' deviations from the network's BatchNorm statistics
(:mod:`synthkd.detector.detector`).
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
from synthkd.data.shards import SyntheticDataset, is_synthetic_dir
from synthkd.detector import Detector, KNearestNeighbours, Mahalanobis, build_density
from synthkd.detector.conformal import check_alpha
from synthkd.detector.detector import check_batchnorm_weight
from synthkd.detector.features import cached_extract, features_cache_dir, resolve_batchnorm_layers, resolve_layer
from synthkd.errors import SynthkdError
from synthkd.models import Classifier

__all__ = ["Detector", "calibrate", "open_inputs"]


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
    density: str = "gmm",
    alpha: float = 0.05,
    layer: str | None = None,
    components: int | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    batchnorm_weight: float = 0.0,
    batchnorm_layers: Sequence[str] | None = None,
    smoothing: float = 0.0,
) -> Detector:
    """Fit the density of ``model``'s features on ``data``, keep held-out calibration scores, and
    write the detector directory ``out``. Features are cached under ``out/features`` (or
    ``$SYNTHKD_FEATURE_CACHE``), so a rerun does not extract them again.

    ``smoothing`` widens the density by Gaussian noise of that variance, in standardised feature
    units (:func:`synthkd.detector.build_density`); about 0.1 suits synthetic data (README)."""
    accelerator = accelerator or make_accelerator()
    check_alpha(alpha)
    density_model = build_density(density, components, seed, smoothing)  # checked before the features are extracted
    if not 0 < holdout < 1:
        raise SynthkdError(f"holdout is the calibration fraction and must lie in (0, 1), got {holdout}")
    check_batchnorm_weight(batchnorm_weight)  # before the features are extracted
    if batchnorm_layers and batchnorm_weight == 0:
        raise SynthkdError("BatchNorm layers were given but the BatchNorm term's weight is 0 (off); "
                           "give a positive --batchnorm-weight, or leave the layers out")
    layer = resolve_layer(model, layer)
    batchnorm = resolve_batchnorm_layers(model, batchnorm_layers) if batchnorm_weight > 0 else []
    dataset = open_inputs(data)
    data_features = cached_extract(model, dataset, accelerator, layer, features_cache_dir(Path(out) / "features"),
                                   batchnorm=batchnorm)
    num_calibration = round(holdout * len(data_features))
    if num_calibration < 1 or len(data_features) - num_calibration < 2:
        raise SynthkdError(
            f"{data} gives {len(data_features)} inputs: too few to fit on {1 - holdout:.0%} and calibrate on "
            f"{holdout:.0%}; use more data or another --holdout"
        )
    order = torch.randperm(len(data_features), generator=torch.Generator().manual_seed(seed))
    fit_part = data_features.select(order[num_calibration:])
    calibration_part = data_features.select(order[:num_calibration])

    fit_features = torch.nn.functional.normalize(fit_part.features, dim=1)  # the detector models directions
    mean, std = fit_features.mean(0), fit_features.std(0)
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))  # constant features stay finite
    device = accelerator.device
    started = time.perf_counter()
    density_model.fit_features(((fit_features - mean) / std).to(device))
    fit_seconds = time.perf_counter() - started
    baselines = {
        "mahalanobis": Mahalanobis().fit_features(fit_part.features.to(device), fit_part.predictions.to(device)),
        "knn": KNearestNeighbours().fit_features(fit_part.features.to(device)),
    }
    info = {
        "data": str(data), "holdout": holdout, "seed": seed, "num_fit": len(fit_part),
        "num_calibration": len(calibration_part), "feature_dim": int(mean.numel()), "fit_seconds": fit_seconds,
    }
    detector = Detector(model, density_model, layer, mean, std, None, alpha, baselines, info, normalize=True,
                        batchnorm=batchnorm, batchnorm_weight=batchnorm_weight)
    detector.fit_terms(fit_part)
    detector.calibration_scores = detector.score_features(calibration_part.features.to(device), calibration_part.deviations)
    if accelerator.is_main_process:
        detector.save_pretrained(out)
    accelerator.wait_for_everyone()
    return detector
