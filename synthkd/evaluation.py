"""Accuracy of a classifier on a dataset, overall and per class, through Accelerate."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from .data.loading import loader_options
from .errors import SynthkdError
from .models import Classifier


@torch.no_grad()
def predict(model: Classifier, dataset: Dataset, accelerator: Accelerator, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels for the whole dataset, gathered from every process."""
    loader = accelerator.prepare_data_loader(DataLoader(dataset, batch_size=batch_size, shuffle=False, **loader_options()))
    model = model.to(accelerator.device).eval()
    all_logits, all_labels = [], []
    for batch in loader:
        labels = batch.targets
        with accelerator.autocast():
            logits = model(batch.images).float()
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def accuracy_report(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    predictions = logits.argmax(1)
    correct = predictions == labels
    per_class = {}
    for index, name in enumerate(class_names):
        members = labels == index
        if members.any():
            per_class[name] = correct[members].float().mean().item()
    return {"accuracy": correct.float().mean().item(), "num_images": len(labels), "per_class": per_class}


def model_class_ids(model_names: list[str], dataset: Dataset) -> torch.Tensor | None:
    """The model's class id of each of ``dataset``'s labels, matched by class name where the dataset
    names classes the model has (a ``[classes=8,9]`` subset numbers them 0, 1; the model 8, 9); None
    where the labels are the model's ids already (the same names, or none) or the class counts
    match (names of another vocabulary, scored by index). Refused where they cannot be matched."""
    names = list(getattr(dataset, "class_names", None) or [])
    if not names or names == model_names:
        return None
    if set(names) <= set(model_names):
        return torch.tensor([model_names.index(name) for name in names])
    if len(names) == len(model_names):
        return None
    missing = [name for name in names if name not in model_names]
    raise SynthkdError(f"the dataset's classes {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} are not among "
                       f"the model's {len(model_names)} classes; evaluate on a set of its classes (e.g. "
                       f"[classes=...] of the dataset it was trained on)")


def as_model_labels(labels: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """``labels`` of a dataset as the model's class ids (:func:`model_class_ids`); -1 stays -1."""
    return labels if ids is None else torch.where(labels >= 0, ids.to(labels.device)[labels.clamp(min=0)], labels)


def evaluate(model: Classifier, dataset: Dataset, accelerator: Accelerator, batch_size: int = 512) -> dict[str, Any]:
    """Accuracy of ``model`` on ``dataset``, its labels taken as the model's classes of the same name."""
    names = model.config.class_names
    logits, labels = predict(model, dataset, accelerator, batch_size)
    if logits.shape[1] != len(names):
        raise SynthkdError(f"the model predicts {logits.shape[1]} classes but its config names {len(names)} class "
                           "names; fix class_names in its config.json")
    return accuracy_report(logits, as_model_labels(labels, model_class_ids(names, dataset)), names)
