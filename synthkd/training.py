"""One training loop, written the Accelerate way, for teachers (labels) and students (KD).

The loop is plain PyTorch: ``accelerator.prepare`` wraps model, optimiser and loader, so the
same code runs on one CPU, several GPUs or several machines. What differs between training a
teacher and distilling a student is only the loss of a batch, passed in as a function.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .accelerator import log_progress, logger, progress_bar, training_memory_format
from .data.loading import loader_options
from .evaluation import evaluate
from .errors import SynthkdError, unpickling_problem, warn
from .io import atomic_write, atomic_write_json, read_json, refuse_changed_settings
from .models import Classifier, unwrap
from .settings import Settings, setting

BatchLoss = Callable[[Classifier, Any], torch.Tensor]


@dataclass
class TrainSettings(Settings):
    """SGD with Nesterov momentum, a linear warm-up and a cosine decay: the loop of teachers,
    end-to-end students and fine-tunes. The fields are what a checkpoint must agree with."""

    epochs: int = setting(10, help="Passes over the training set (0: train nothing).", at_least=0)
    batch_size: int = setting(128, help="Images per optimiser step.", positive=True)
    lr: float = setting(0.1, help="Peak learning rate, reached after the warm-up.", positive=True)
    weight_decay: float = setting(5e-4, help="L2 weight decay.", at_least=0)
    momentum: float = setting(0.9, help="SGD momentum (Nesterov).", at_least=0, below=1)
    warmup_epochs: float = setting(0.5, help="Epochs of linear warm-up before the cosine decay.", at_least=0)
    seed: int = setting(0, help="Seeds the batch order, augmentation and MixUp of every epoch.")
    channels_last: bool = setting(True, help="Train in channels-last memory format where it is safe and pays "
                                              "(accelerators; CPU stays contiguous).", cli=False)


@dataclass
class KDSettings(Settings):
    """How a student is taught: the teacher labels cropped, maybe flipped and mixed views of the
    inputs, and the student matches its temperature-softened outputs (e2e KD, the head of
    neighbourhood distillation, fine-tunes)."""

    temperature: float = setting(4.0, help="KD temperature.", positive=True)
    mixup: float = setting(1.0, help="MixUp Beta alpha on the synthetic images (0: off).", at_least=0)
    flip: bool = setting(True, help="Random horizontal flips of the synthetic images.")


class Checkpoint:
    """Training state after the last finished epoch: ``training_state.pt`` (tensors and plain
    values only, read back with ``weights_only=True``) written atomically by the main process."""

    NAME = "training_state.pt"
    RECORD = "training.json"  # what a finished run was trained with, once its state is discarded

    def __init__(self, directory: str | os.PathLike, config: Any, accelerator: Accelerator,
                 inputs: dict[str, Any] | None = None):
        """``config``: the loop's settings as a dataclass (TrainSettings, DiffusionTrainSettings, ...);
        ``inputs``: everything else the state depends on (the stage's settings, the data's and the
        teacher's fingerprints, the model's config). A resume with any of them changed is refused."""
        self.path = Path(directory) / self.NAME
        self.record = {"config": json.loads(json.dumps(asdict(config), default=str)),
                       **json.loads(json.dumps(inputs or {}, default=str))}
        self.accelerator = accelerator

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> list[dict[str, Any]]:
        finished = self.path.with_name(self.RECORD)
        if not self.path.is_file() and finished.is_file():  # a finished run: trained again only with its settings
            refuse_changed_settings(f"{self.path.parent} was trained", read_json(finished)["record"], self.record)
        found = torch.tensor([float(self.path.is_file())], device=self.accelerator.device)
        if self.accelerator.gather(found).min().item() < 1:
            return []  # not every rank sees it (no shared disk): start afresh everywhere
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if "record" not in state and isinstance(state.get("config"), dict):  # written before inputs were recorded
                recorded = {**self.record, "config": json.loads(json.dumps(state["config"], default=str))}
                if self.accelerator.is_main_process:
                    warn(f"{self.path} records only its training settings; resuming without checking its data and models")
            else:
                recorded = json.loads(state["record"])
        except Exception as error:  # an unpickler refusal, a truncated file, an older format
            raise SynthkdError(f"{self.path} is not a training state of this synthkd ({unpickling_problem(error)}); "
                               "delete it to start again") from error
        refuse_changed_settings(f"{self.path} was written", recorded, self.record)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        logger.info(f"resuming after epoch {len(state['history'])} from {self.path}")
        return list(state["history"])

    def save(self, model: nn.Module, optimizer, scheduler, history: list[dict[str, Any]]) -> None:
        if self.accelerator.is_main_process:
            state = {
                "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history, "record": json.dumps(self.record, sort_keys=True),
            }
            atomic_write(self.path, lambda tmp: torch.save(state, tmp))
        self.accelerator.wait_for_everyone()


def warmup_cosine(optimizer: torch.optim.Optimizer, config: TrainSettings, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up for ``config.warmup_epochs``, then cosine decay to zero, stepped per batch."""
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(
    model: Classifier,
    dataset: Dataset,
    batch_loss: BatchLoss,
    config: TrainSettings,
    accelerator: Accelerator,
    eval_dataset: Dataset | None = None,
    description: str = "train",
    checkpoint_dir: str | os.PathLike | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    checkpoint_inputs: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` in place with SGD + warmup/cosine; returns one record per epoch.

    With ``checkpoint_dir`` the state is saved after every epoch and a rerun resumes after the
    last finished epoch (a checkpoint of different settings, or of other ``checkpoint_inputs``, is
    refused). ``on_epoch_start(epoch)``
    runs before each epoch, e.g. to add data to ``dataset`` (whose length must not change)."""
    if config.channels_last:
        model = model.to(memory_format=training_memory_format(accelerator.device))
    generator = torch.Generator()  # the loader's order, seeded per epoch in _run_epoch
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=len(dataset) > config.batch_size,
                        generator=generator, **loader_options())
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
    )
    # Accelerate steps a prepared scheduler once per process for every optimiser step, so the
    # schedule counts the batches of the whole (unsharded) loader.
    scheduler = warmup_cosine(optimizer, config, max(1, len(loader)))
    checkpoint = Checkpoint(checkpoint_dir, config, accelerator, checkpoint_inputs) if checkpoint_dir else None
    history = checkpoint.restore(model, optimizer, scheduler) if checkpoint else []
    prepared_model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    for epoch in range(len(history), config.epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        generator.manual_seed(seed_epoch(config.seed, epoch))
        started, cpu_started = time.perf_counter(), time.process_time()
        loss = _run_epoch(prepared_model, loader, batch_loss, optimizer, scheduler, accelerator,
                          f"{description} {epoch + 1}/{config.epochs}")
        # CPU seconds beside wall seconds: on a shared machine they still compare methods fairly.
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": loss, "seconds": time.perf_counter() - started,
                                  "cpu_seconds": time.process_time() - cpu_started}
        if eval_dataset is not None:
            record["eval_accuracy"] = evaluate(accelerator.unwrap_model(prepared_model), eval_dataset, accelerator)["accuracy"]
        history.append(record)
        log_progress(accelerator, description, record)
        if checkpoint:
            checkpoint.save(accelerator.unwrap_model(prepared_model), optimizer, scheduler, history)
    accelerator.wait_for_everyone()
    model.to(memory_format=torch.contiguous_format)
    return history


def seed_epoch(seed: int, epoch: int) -> int:
    """Seed the global RNGs (augmentation, MixUp) for ``epoch`` and return the loader's order seed.
    Every epoch's randomness comes from (seed, epoch) alone, so a resumed run draws what an
    uninterrupted one would."""
    order_seed, augmentation_seed = np.random.SeedSequence([seed, epoch]).generate_state(2)
    set_seed(int(augmentation_seed))
    return int(order_seed)


def _run_epoch(model: nn.Module, loader: DataLoader, batch_loss: BatchLoss, optimizer: torch.optim.Optimizer, scheduler,
               accelerator: Accelerator, description: str) -> float:
    """One pass over ``loader``; the mean loss over the batches and the processes."""
    model.train()
    total, batches = 0.0, 0
    bar = progress_bar(accelerator, loader, desc=description, leave=False)
    for batch in bar:
        with accelerator.autocast():
            loss = batch_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        total += loss.item()
        batches += 1
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return accelerator.reduce(torch.tensor(total / max(1, batches), device=accelerator.device), "mean").item()


def discard_training_state(directory: str | os.PathLike) -> None:
    """Replace a finished run's training state by the record of its settings and inputs
    (``training.json``): a model directory is what users share, the optimizer and schedule only
    serve resuming an interrupted run, and the record still refuses a rerun with other settings."""
    path = Path(directory) / Checkpoint.NAME
    if not path.is_file():
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "record" in state:
        atomic_write_json(path.with_name(Checkpoint.RECORD), {"record": json.loads(state["record"]), "epochs": len(state["history"])})
    path.unlink()
