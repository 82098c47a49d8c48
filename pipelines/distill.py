"""Stage: distill a student from a teacher on a synthetic set, end to end (Hinton KD) or
neighbourhood by neighbourhood."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import Dataset

from synthkd.accelerator import make_accelerator
from synthkd.augment import distillation_augmentation
from synthkd.data import SyntheticBatch, load_dataset
from synthkd.data.activations import ActivationDataset
from synthkd.data.reader import SyntheticDataset
from synthkd.errors import SynthkdError, warn
from synthkd.evaluation import evaluate
from synthkd.io import atomic_write_json
from synthkd.losses import DISTILLATION_LOSSES
from synthkd.neighbourhood_training import NEIGHBOURHOOD_LR, NeighbourhoodDistiller, NeighbourhoodSettings
from synthkd.models import Classifier, ModelConfig, import_factory, is_registered, load_model, model_source_problem
from synthkd.seeds import derive_seed
from synthkd.settings import Settings, setting
from synthkd.training import KDSettings, TrainSettings, fit

E2E_LR = 0.05  # SGD on the whole student; each neighbourhood's Adam starts from NEIGHBOURHOOD_LR


@dataclass
class StudentSettings(Settings):
    """The student: a zoo architecture at ``width``, or a model directory / FILE.py:factory to start from."""

    arch: str = setting("resnet20", flag="--student", help="Zoo architecture, or a model directory / FILE.py:factory to start from.",
                        check=lambda spec: model_source_problem(spec, zoo=True))
    width: float = setting(0.5, flag="--student-width", help="Width multiplier of a zoo student.", positive=True)


@dataclass
class DistillSettings(KDSettings):
    """End-to-end KD, or neighbourhood by neighbourhood (then an optional e2e fine-tune).

    ``epochs`` defaults to 50, the YAML schema's value (the CLI said 30): the standard setting's
    recorded results and the README's commands use 50, and the run fingerprints of configs that
    leave it out stay the same."""

    mode: Literal["e2e", "neighbourhood"] = setting("e2e", help="e2e: KD on the whole student; neighbourhood: "
                                                                "each block learns its teacher block, then merge.")
    epochs: int = setting(50, help="Distillation epochs (of every neighbourhood in neighbourhood mode).", positive=True)
    batch_size: int = setting(128, help="Images per optimiser step.", positive=True)
    lr: float | None = setting(None, positive=True,
                               help=f"Learning rate: default {E2E_LR} (e2e, SGD) or {NEIGHBOURHOOD_LR} (each neighbourhood, Adam).")
    cuts: str = setting("blocks", help="Neighbourhood mode: blocks, stages, or comma-separated module paths.")
    finetune_epochs: int = setting(0, help="Neighbourhood mode: end-to-end KD epochs after the merge.", at_least=0)
    finetune_lr: float = setting(0.01, help="Neighbourhood mode: SGD learning rate of the fine-tune.", positive=True)
    eval_every_epoch: bool = setting(True, cli=False, help="Evaluate on eval_dataset after every epoch (synthkd run).")
    augment: bool = setting(True, help="e2e: KD on pad-and-crop views the teacher labels; --no-augment (with --no-flip "
                                       "and --mixup 0) trains on the images as made, against the teacher's logits "
                                       "stored with the set: no teacher forward pass.")
    teacher_views: int = setting(0, at_least=0,
                                 help="e2e: label this many augmented views (crop, flip, MixUp) of every image with the "
                                      "teacher once, before training, and train on them (one drawn per image per epoch): "
                                      "no teacher forward per step; 0: the teacher labels fresh views at every step.")

    def cross_problems(self) -> list[tuple[str, str]]:
        if self.teacher_views and (self.mode != "e2e" or not self.augment):
            return [("teacher_views", "labels augmented views for e2e KD: use it with --mode e2e and without --no-augment")]
        if self.augment:
            return []
        problems = []
        if self.flip or self.mixup > 0:
            problems.append(("augment", "is off, and training on the stored images as made also needs --no-flip and --mixup 0"))
        if self.mode != "e2e":
            problems.append(("augment", "is off, which is for --mode e2e (neighbourhoods learn from the teacher's activations)"))
        return problems

    def learning_rate(self) -> float:
        """``lr``, or the mode's default: the one place the e2e/neighbourhood rule is written."""
        if self.lr is not None:
            return self.lr
        return E2E_LR if self.mode == "e2e" else NEIGHBOURHOOD_LR

    def training(self, seed: int) -> TrainSettings:
        """The e2e KD loop's settings."""
        return TrainSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.learning_rate(), seed=seed)

    def neighbourhoods(self, seed: int) -> NeighbourhoodSettings:
        return NeighbourhoodSettings(cuts=self.cuts, epochs=self.epochs, batch_size=self.batch_size, lr=self.learning_rate(),
                                     temperature=self.temperature, mixup=self.mixup, flip=self.flip, seed=seed)

    def finetune(self, seed: int) -> TrainSettings:
        return finetune_settings(self.finetune_epochs, self.batch_size, self.finetune_lr, seed)


def finetune_settings(epochs: int, batch_size: int, lr: float, seed: int) -> TrainSettings:
    """The e2e KD of a merged student: no warm-up, its pieces are trained already."""
    return TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, warmup_epochs=0.0)


def build_student(student: str, teacher: Classifier, width: float = 1.0, seed: int = 0) -> Classifier:
    """A zoo architecture sized to the teacher's input and classes, or an existing model
    directory / FILE.py:factory used as the starting point; classes must match the teacher's."""
    fmt = teacher.input_format
    set_seed(seed)  # initial weights come from the global RNG
    if is_registered(student):
        config = ModelConfig(
            arch=student,
            arch_kwargs={"width": width, "in_channels": fmt.channels, "num_classes": teacher.num_classes},
            input=fmt,
            class_names=list(teacher.config.class_names),
        )
        return Classifier.from_config(config)
    if Path(student).is_dir():
        model = load_model(student)
    else:
        net = import_factory(student)()
        model = Classifier(net, ModelConfig(arch=student, input=fmt, class_names=list(teacher.config.class_names)))
    with torch.no_grad():
        classes = model.eval()(torch.zeros(2, *fmt.shape)).shape[1]
    if classes != teacher.num_classes:
        raise SynthkdError(
            f"the student {student} predicts {classes} classes but the teacher predicts {teacher.num_classes}; "
            "build the student with the teacher's number of classes"
        )
    return model


class LabelledViews(Dataset):
    """``views`` augmented copies of every image of ``dataset`` (the distillation views: crop, flip,
    MixUp within random batches), each with the teacher's logits, made once; an item is one of
    its image's views, drawn from the global RNG (seeded per epoch by the training loop), with
    those logits as the KD target. Views are kept in float16 (half the memory; KD is insensitive
    to it). The teacher's forward passes then cost ``views`` epochs instead of every epoch."""

    def __init__(self, dataset: Dataset, teacher: Classifier, augment: nn.Module, views: int, seed: int,
                 batch_size: int = 256):
        device = next(teacher.parameters()).device
        images = torch.stack([dataset[i].images for i in range(len(dataset))])
        count = len(images)
        self.images = torch.empty(views, *images.shape, dtype=torch.float16)
        self.logits = torch.empty(views, count, teacher.num_classes)
        teacher.eval()
        augment.train()
        with torch.no_grad():
            for view in range(views):
                torch.manual_seed(derive_seed(seed, "teacher-views", view))
                order = torch.randperm(count)
                for start in range(0, count, batch_size):
                    rows = order[start:start + batch_size]
                    batch = augment(images[rows].to(device))
                    self.logits[view, rows] = teacher(batch).float().cpu()
                    self.images[view, rows] = batch.to(torch.float16).cpu()

    def __len__(self) -> int:
        return self.images.shape[1]

    def __getitem__(self, index: int) -> SyntheticBatch:
        view = int(torch.randint(len(self.images), ()))
        return SyntheticBatch(self.images[view, index].float(), self.logits[view, index], -1)


class KDObjective(nn.Module):
    """Loss of one batch: the teacher labels augmented views of the images, or, with
    ``stored_targets``, the images are used as made and the teacher's logits stored with the
    synthetic set are the targets (no teacher forward at all: they were computed on exactly
    these images; any crop, flip or mix would make them the wrong target)."""

    def __init__(self, teacher: Classifier, kd: KDSettings, stored_targets: bool = False):
        super().__init__()
        fmt = teacher.input_format
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = kd.temperature
        self.stored_targets = stored_targets
        self.augment = distillation_augmentation(fmt.height, fmt.width, kd.flip, kd.mixup)

    def forward(self, student: nn.Module, batch) -> torch.Tensor:
        if self.stored_targets:
            views, target = batch.images, batch.logits.float()
        else:
            views = self.augment(batch.images)
            with torch.no_grad():
                target = self.teacher(views).float()
        return DISTILLATION_LOSSES.get("kd")(student(views).float(), target, self.temperature)


def open_training_data(data: str | os.PathLike, teacher: Classifier, accelerator: Accelerator,
                       stored_targets: bool = False) -> Dataset:
    """A synthetic set directory, or a real dataset spec (for the KD-on-real-data reference);
    a synthetic set must have the teacher's classes. ``stored_targets``: its logits will be the
    targets, so it must be a synthetic set made by this very teacher."""
    if not Path(data).exists() and ":" in str(data):
        if stored_targets:
            raise SynthkdError(f"--no-augment reads the teacher's logits stored with a synthetic set, and {data} is a "
                               "real dataset; drop --no-augment")
        return load_dataset(str(data))
    synthetic = SyntheticDataset(data)  # names a missing directory clearly
    recorded = synthetic.manifest.get("teacher", {}).get("fingerprint")
    if recorded and recorded != teacher.fingerprint():
        if stored_targets:
            raise SynthkdError(f"{data} was generated by another teacher ({recorded}), so its stored logits are not "
                               "this teacher's; drop --no-augment (the teacher then labels every view)")
        if accelerator.is_main_process:
            warn(f"{data} was generated by another teacher ({recorded}); distilling anyway")
    if synthetic.num_classes != teacher.num_classes:
        raise SynthkdError(
            f"{data} has {synthetic.num_classes} classes but the teacher predicts {teacher.num_classes}; "
            "generate the data with this teacher"
        )
    return synthetic


def finish(
    teacher: Classifier, student: Classifier, metrics: dict[str, Any], out: str | os.PathLike,
    evaluation: Dataset | None, eval_dataset: str | None, accelerator: Accelerator,
) -> tuple[Classifier, dict[str, Any]]:
    """Evaluate teacher and student, save the student with its ``metrics.json``."""
    if evaluation is not None:
        metrics["eval_dataset"] = eval_dataset
        metrics["student"] = evaluate(student, evaluation, accelerator)
        metrics["teacher"] = evaluate(teacher, evaluation, accelerator)
        metrics["gap"] = metrics["teacher"]["accuracy"] - metrics["student"]["accuracy"]
    if accelerator.is_main_process:
        student.save_pretrained(out)
        atomic_write_json(Path(out) / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    return student, metrics


def distill_e2e(
    teacher: Classifier,
    student: Classifier,
    data: str | os.PathLike,
    out: str | os.PathLike,
    settings: DistillSettings | None = None,
    seed: int = 0,
    eval_dataset: str | None = None,
    accelerator: Accelerator | None = None,
) -> tuple[Classifier, dict[str, Any]]:
    """Train ``student`` to match ``teacher`` on ``data`` (a synthetic set directory or a real
    dataset spec; labels are never used, the teacher labels every augmented view, or the set's
    stored logits are read with ``settings.augment`` off); save to ``out``."""
    accelerator = accelerator or make_accelerator()
    settings = settings or DistillSettings()
    settings.check()
    train = settings.training(seed)
    training_data = open_training_data(data, teacher, accelerator, stored_targets=not settings.augment)
    evaluation = load_dataset(eval_dataset) if eval_dataset else None
    teacher.to(accelerator.device)
    stored = not settings.augment or settings.teacher_views > 0
    objective = KDObjective(teacher, settings, stored_targets=stored).to(accelerator.device)
    started = time.perf_counter()
    if settings.teacher_views:
        training_data = LabelledViews(training_data, teacher, objective.augment, settings.teacher_views, seed)
    views_seconds = time.perf_counter() - started
    history = fit(student, training_data, objective, train, accelerator, evaluation, description="distill",
                  checkpoint_dir=out)
    metrics: dict[str, Any] = {
        "mode": "e2e",
        "data": str(data),
        "num_training_images": len(training_data),
        "train": asdict(train),
        "temperature": settings.temperature,
        "mixup": settings.mixup,
        "history": history,
        "distill_seconds": time.perf_counter() - started,
        "num_processes": accelerator.num_processes,
    }
    if not settings.augment:
        metrics["targets"] = "stored logits"
    if settings.teacher_views:
        metrics.update(targets=f"{settings.teacher_views} views labelled once", teacher_views_seconds=views_seconds)
    return finish(teacher, student, metrics, out, evaluation, eval_dataset, accelerator)


def data_fingerprint(data: str | os.PathLike, dataset: Dataset) -> str:
    """Identifies the training data: a synthetic set by its manifest's shard checksums."""
    if isinstance(dataset, SyntheticDataset):
        return "-".join(shard["sha256"][:8] for shard in dataset.manifest["shards"])
    if isinstance(dataset, ActivationDataset):
        return dataset.fingerprint()
    return f"{data}:{len(dataset)}"


def kd_finetune(
    teacher: Classifier, student: Classifier, training_data: Dataset, kd: KDSettings, finetune: TrainSettings,
    accelerator: Accelerator, evaluation: Dataset | None = None,
) -> dict[str, Any]:
    """End-to-end KD of a merged student, to absorb the error that accumulates across its cuts
    (with the views and temperature its pieces were distilled with)."""
    started = time.perf_counter()
    objective = KDObjective(teacher.to(accelerator.device), kd).to(accelerator.device)
    history = fit(student, training_data, objective, finetune, accelerator, evaluation, description="fine-tune")
    return {"finetune_history": history, "finetune_seconds": time.perf_counter() - started}


def distill_neighbourhood(
    teacher: Classifier,
    student: Classifier,
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: NeighbourhoodSettings | None = None,
    finetune: TrainSettings | None = None,
    eval_dataset: str | None = None,
    accelerator: Accelerator | None = None,
    inputs: str = "images",
) -> tuple[Classifier, dict[str, Any]]:
    """Distill neighbourhood by neighbourhood (in parallel across ranks), merge, optionally
    fine-tune end to end, save to ``out`` with ``metrics.json``. ``inputs="activations"``:
    ``data`` is a per-neighbourhood activation set and no image is used (so no fine-tune)."""
    accelerator = accelerator or make_accelerator()
    config = config or NeighbourhoodSettings()
    if inputs == "activations":
        if finetune is not None and finetune.epochs > 0:
            raise SynthkdError("the end-to-end fine-tune needs images; with --inputs activations use --finetune-epochs 0")
        training_data = ActivationDataset(data)
        if training_data.teacher_fingerprint != teacher.fingerprint() and accelerator.is_main_process:
            warn(f"{data} was made from another teacher; distilling anyway")
    elif inputs == "images":
        training_data = open_training_data(data, teacher, accelerator)
    else:
        raise SynthkdError(f"unknown --inputs {inputs!r}; use images or activations")
    out = Path(out)
    evaluation = load_dataset(eval_dataset) if eval_dataset else None
    started = time.perf_counter()
    distiller = NeighbourhoodDistiller(teacher, student, config, accelerator)
    report = distiller.train(training_data, out, data_fingerprint(data, training_data))
    student = distiller.merge()
    metrics: dict[str, Any] = {
        "mode": "neighbourhood", "inputs": inputs, "data": str(data), "num_training_images": len(training_data),
        "config": asdict(config), "cuts": distiller.cuts, **report,
        "neighbourhood_seconds": time.perf_counter() - started, "num_processes": accelerator.num_processes,
    }
    if evaluation is not None:
        metrics["merged"] = evaluate(student, evaluation, accelerator)
    if finetune is not None and finetune.epochs > 0:
        metrics.update(kd_finetune(teacher, student, training_data, config, finetune, accelerator, evaluation))
    metrics["distill_seconds"] = metrics["neighbourhood_seconds"] + metrics.get("finetune_seconds", 0.0)
    return finish(teacher, student, metrics, out, evaluation, eval_dataset, accelerator)


def distill(
    teacher: Classifier,
    student: StudentSettings,
    data: str | os.PathLike,
    out: str | os.PathLike,
    settings: DistillSettings,
    seed: int = 0,
    eval_dataset: str | None = None,
    accelerator: Accelerator | None = None,
    inputs: str = "images",
) -> tuple[Classifier, dict[str, Any]]:
    """The distill stage (``synthkd distill`` and ``synthkd run``): build the student, distill it in
    ``settings.mode``, save it to ``out``. ``inputs``: see :func:`distill_neighbourhood`."""
    student_model = build_student(student.arch, teacher, student.width, seed)
    if settings.mode == "e2e":
        return distill_e2e(teacher, student_model, data, out, settings, seed, eval_dataset, accelerator)
    return distill_neighbourhood(teacher, student_model, data, out, settings.neighbourhoods(seed), settings.finetune(seed),
                                 eval_dataset, accelerator, inputs)
