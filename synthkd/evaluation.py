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
    if logits.shape[1] != len(class_names):
        raise SynthkdError(f"the model predicts {logits.shape[1]} classes but its config names {len(class_names)} class "
                           "names; fix class_names in its config.json")
    predictions = logits.argmax(1)
    correct = predictions == labels
    per_class = {}
    for index, name in enumerate(class_names):
        members = labels == index
        if members.any():
            per_class[name] = correct[members].float().mean().item()
    return {"accuracy": correct.float().mean().item(), "num_images": len(labels), "per_class": per_class}


def evaluate(model: Classifier, dataset: Dataset, accelerator: Accelerator, batch_size: int = 512) -> dict[str, Any]:
    logits, labels = predict(model, dataset, accelerator, batch_size)
    return accuracy_report(logits, labels, model.config.class_names)
