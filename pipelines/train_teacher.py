"""Stage: train a teacher on a real dataset (users bring their own; the demo and benchmarks need one)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from synthkd.accelerator import make_accelerator
from synthkd.augment import training_augmentation
from synthkd.data import load_dataset
from synthkd.errors import SynthkdError
from synthkd.evaluation import evaluate
from synthkd.io import atomic_write_json
from synthkd.models import MODELS, Classifier, InputFormat, ModelConfig
from synthkd.settings import Settings, setting
from synthkd.training import TrainSettings, discard_training_state, fit

from .distill import data_fingerprint


@dataclass
class TeacherSettings(Settings):
    """A zoo architecture trained with cross-entropy (``synthkd train-teacher``, the ``teacher:``
    section of ``synthkd run``)."""

    arch: str = setting("resnet20", help="Zoo architecture (see `synthkd models`).", choices=MODELS.names)
    width: float = setting(1.0, help="Width multiplier.", positive=True)
    epochs: int = setting(15, help="Training epochs.", positive=True)
    batch_size: int = setting(128, help="Images per optimiser step.", positive=True)
    lr: float = setting(0.1, help="Peak SGD learning rate.", positive=True)
    flip: bool = setting(True, help="Random horizontal flips while training.")

    def training(self, seed: int) -> TrainSettings:
        return TrainSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=seed)


def train_teacher(
    dataset: str,
    settings: TeacherSettings,
    out: str | os.PathLike,
    seed: int = 0,
    eval_dataset: str | None = None,
    accelerator: Accelerator | None = None,
) -> tuple[Classifier, dict[str, Any]]:
    """Train ``settings.arch`` on ``dataset`` with cross-entropy and save it as a model directory
    with its ``metrics.json`` (a rerun resumes after the last finished epoch)."""
    accelerator = accelerator or make_accelerator()
    data = load_dataset(dataset)
    if not hasattr(data, "class_names") or not data.class_names:
        raise SynthkdError(f"{dataset} has no class labels to train a teacher on")
    evaluation = load_dataset(eval_dataset) if eval_dataset else None
    channels, height, width_px = data.image_shape
    mean, std = data.channel_stats()
    config = ModelConfig(
        arch=settings.arch,
        arch_kwargs={"width": settings.width, "in_channels": channels, "num_classes": len(data.class_names)},
        input=InputFormat(channels, height, width_px, mean, std),
        class_names=list(data.class_names),
    )
    set_seed(seed)  # the initial weights come from the global RNG
    model = Classifier.from_config(config)
    augment = training_augmentation(height, width_px, flip=settings.flip).to(accelerator.device)

    def batch_loss(net, batch):
        return F.cross_entropy(net(augment(batch.images)), batch.targets)

    resumable = {"settings": settings.to_dict(), "data": data_fingerprint(dataset, data), "model": config.to_dict()}
    history = fit(model, data, batch_loss, settings.training(seed), accelerator, evaluation, description="teacher",
                  checkpoint_dir=out, checkpoint_inputs=resumable)
    metrics: dict[str, Any] = {"dataset": dataset, "history": history, "train_seconds": sum(h["seconds"] for h in history)}
    if evaluation is not None:
        metrics["eval"] = evaluate(model, evaluation, accelerator)
        metrics["eval_dataset"] = eval_dataset
    if accelerator.is_main_process:
        model.save_pretrained(out)
        atomic_write_json(Path(out) / "metrics.json", metrics)
        discard_training_state(out)
    accelerator.wait_for_everyone()
    return model, metrics
