"""Stage: distill a student from a teacher on a synthetic set, end to end (Hinton KD) or
neighbourhood by neighbourhood."""

from __future__ import annotations

import os
import shutil
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
from synthkd.models import (Classifier, ModelConfig, classes_kwarg, import_factory, is_source_spec, load_model,
                            model_source_problem, open_source, unwrap)
from synthkd.models.pruning import hold_at_zero, prune_by_magnitude
from synthkd.models.registry import ZOO_SPEC_GRAMMAR, parse_zoo_spec, spec_arguments
from synthkd.models.sources import parse_source
from synthkd.models.born import (IMPORTANCES, PRUNED_ARCH, birth_record, born_like, format_probe, is_narrower_copy,
                                 prune_to_budget, prune_to_width, pruned_arch_kwargs, recalibrate_batchnorm)
from synthkd.models.thinning import THINNED_ARCH, copy_from_teacher, is_thinning_of, thin, thinned_arch_kwargs
from synthkd.seeds import derive_seed
from synthkd.teacher_activations import cache_directory
from synthkd.settings import Settings, setting, shared_setting
from synthkd.training import KDSettings, TrainSettings, discard_training_state, fit

E2E_LR = 0.05  # SGD on the whole student; each neighbourhood's Adam starts from NEIGHBOURHOOD_LR


@dataclass
class StudentSettings(Settings):
    """The student: a zoo architecture (with arguments), a model source, or a model directory / FILE.py:factory to start from."""

    arch: str = setting("resnet20", flag="--student", check=lambda spec: student_spec_problem(spec),
                        help=f"{ZOO_SPEC_GRAMMAR}; teacher:inner=R (any traceable teacher, thinner inside each "
                             "neighbourhood); teacher:width=W, teacher:params=F or teacher:flops=F (the teacher pruned "
                             "through its dependency graph, residual streams included, to width W or within a fraction F "
                             "of its parameters/FLOPs; importance=l1|bn|taylor, recalibrate=true|false in any student "
                             "spec: how it is born from the teacher); a model source (torchvision:NAME, timm:NAME, hf:DIR, "
                             "hub:DIR:ENTRY, each with ?KEY=VALUE arguments); or a model directory / FILE.py:factory to "
                             "start from.")
    width: float | None = setting(None, flag="--student-width", positive=True,
                                  help="Width multiplier of a zoo student. Default: 0.5 end to end; in neighbourhood mode "
                                       "the teacher's width with inner=0.5 (thinner inside each block, so every cut "
                                       "keeps the teacher's activation shape).")

    def spec(self, mode: str, teacher: Classifier) -> str:
        """The student spec with the mode's default arguments filled in: the one place they live."""
        parsed = parse_zoo_spec(self.arch)
        if parsed is None:
            return self.arch
        name, kwargs = parsed
        if mode == "neighbourhood" and self.width is None and "width" not in kwargs:  # the teacher's interfaces
            width = teacher.config.arch_kwargs.get("width", 1.0) if teacher.config.arch == name else 1.0
            kwargs = {**kwargs, "width": width} if "inner" in kwargs else {"width": width, "inner": 0.5, **kwargs}
        elif "width" not in kwargs:
            kwargs["width"] = 0.5 if self.width is None else self.width
        return f"{name}:" + ",".join(f"{key}={value}" for key, value in kwargs.items())


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
    init: Literal["teacher", "random"] = setting(
        "teacher", help="teacher: a student that is the teacher's zoo architecture thinner inside its blocks (e.g. "
                        "inner=0.5), narrower or with fewer blocks, or teacher:width/params/flops, starts as the teacher's "
                        "most important channels; random: fresh weights. Other students always start from their own "
                        "weights.")
    adapters: bool = shared_setting(NeighbourhoodSettings, "adapters")
    cache: Literal["auto", "memory", "disk"] = shared_setting(NeighbourhoodSettings, "cache")
    cache_dir: str | None = shared_setting(NeighbourhoodSettings, "cache_dir")
    cache_views: int = shared_setting(NeighbourhoodSettings, "cache_views")
    cache_dtype: Literal["float32", "float16"] = shared_setting(NeighbourhoodSettings, "cache_dtype")
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
                                     temperature=self.temperature, mixup=self.mixup, flip=self.flip, seed=seed,
                                     adapters=self.adapters, cache=self.cache, cache_dir=self.cache_dir,
                                     cache_views=self.cache_views, cache_dtype=self.cache_dtype)

    def finetune(self, seed: int) -> TrainSettings:
        return finetune_settings(self.finetune_epochs, self.batch_size, self.finetune_lr, seed)


def finetune_settings(epochs: int, batch_size: int, lr: float, seed: int) -> TrainSettings:
    """The e2e KD of a merged student: no warm-up, its pieces are trained already."""
    return TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, warmup_epochs=0.0)


def student_for(student: StudentSettings, settings: DistillSettings, teacher: Classifier, seed: int = 0,
                images: torch.Tensor | None = None) -> Classifier:
    """The student a distill stage in ``settings.mode`` starts from (``images``: see :func:`build_student`)."""
    return build_student(student.spec(settings.mode, teacher), teacher, seed=seed, from_teacher=settings.init == "teacher",
                         cuts=settings.cuts, images=images)


TEACHER_STUDENT = "teacher"  # the spec ``teacher[:KEY=VALUE,...]``: the teacher itself, thinned or pruned
TEACHER_SIZES = ("inner", "width", "params", "flops")
# How a student starts from the teacher, in any student spec: the channels' importance criterion
# and whether batch-norm statistics are re-estimated on the synthetic images after pruning.
BIRTH_OPTIONS: dict[str, Any] = {"importance": "l1", "recalibrate": True}


def birth_options(kwargs: dict[str, Any], spec: str) -> dict[str, Any]:
    """The birth options of a spec's arguments, removed from ``kwargs`` (they are no architecture's)."""
    options = {key: kwargs.pop(key, default) for key, default in BIRTH_OPTIONS.items()}
    if options["importance"] not in IMPORTANCES:
        raise SynthkdError(f"{spec!r}: importance={options['importance']} is none of {', '.join(IMPORTANCES)}")
    if not isinstance(options["recalibrate"], bool):
        raise SynthkdError(f"{spec!r}: recalibrate is true or false, got {options['recalibrate']!r}")
    return options


def teacher_size(spec: str) -> tuple[str, float, dict[str, Any]]:
    """``teacher:KEY=VALUE,...`` -> (size key, its value, birth options); one line where it is malformed:
    one size of ``inner`` (interface-keeping thinning, default 0.5), ``width`` (every channel group
    pruned), ``params`` / ``flops`` (a budget, as a fraction of the teacher's), each in (0, 1]."""
    kwargs = spec_arguments(spec.partition(":")[2], spec)
    options = birth_options(kwargs, spec)
    unknown = sorted(set(kwargs) - set(TEACHER_SIZES))
    if unknown:
        raise SynthkdError(f"{spec!r}: the teacher as a student takes one of {', '.join(f'{k}=R' for k in TEACHER_SIZES)} "
                           f"(and importance=, recalibrate=), not {', '.join(unknown)}")
    if len(kwargs) > 1:
        raise SynthkdError(f"{spec!r}: give one size of {', '.join(TEACHER_SIZES)}, not {', '.join(sorted(kwargs))}")
    key, value = next(iter(kwargs.items()), ("inner", 0.5))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise SynthkdError(f"{spec!r}: {key} is a fraction of the teacher's in (0, 1], got {value!r}")
    return key, float(value), options


def student_spec_problem(spec: str) -> str | None:
    """Why ``spec`` cannot name a student, before any model is loaded, or None."""
    try:
        if spec == TEACHER_STUDENT or spec.startswith(TEACHER_STUDENT + ":"):
            teacher_size(spec)
            return None
        parsed = parse_zoo_spec(spec)
        if parsed is not None:
            birth_options(parsed[1], spec)
    except SynthkdError as error:
        return str(error)
    return model_source_problem(spec, zoo=True)


def network_inputs(teacher: Classifier, images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images as the teacher's network takes them."""
    fmt = teacher.input_format
    return fmt.normalize(fmt.adapt(images))


def teacher_student(spec: str, teacher: Classifier, cuts: str | list[str], from_teacher: bool,
                    images: torch.Tensor | None = None) -> Classifier:
    """``teacher:inner=R``: any traceable teacher with every inner channel group of each
    neighbourhood (a convolution/linear feeding exactly one other through per-channel operations)
    cut to R of its channels, found with torch.fx; the interfaces stay the teacher's.
    ``teacher:width=W`` / ``params=F`` / ``flops=F``: the teacher pruned through its dependency
    graph (residual streams included) to width W, or to the widest uniform width within the
    budget. ``from_teacher`` False: the same shapes with fresh weights."""
    key, value, options = teacher_size(spec)
    net = unwrap(teacher.net).cpu()
    probe = format_probe(teacher.input_format)
    if key == "inner":
        if options["importance"] != BIRTH_OPTIONS["importance"]:
            raise SynthkdError(f"{spec!r}: inner thinning keeps the channels of largest L1 x |batch-norm scale|; "
                               "importance= is for width=, params= and flops=")
        thinned, kept = thin(net, value, cuts, probe=probe, teacher_weights=from_teacher)
        arch_kwargs = thinned_arch_kwargs(teacher.config.arch, teacher.config.arch_kwargs, kept)
        return Classifier(thinned, ModelConfig(arch=THINNED_ARCH, arch_kwargs=arch_kwargs, input=teacher.input_format,
                                               class_names=list(teacher.config.class_names)))
    inputs = None if images is None else network_inputs(teacher, images)
    if key == "width":
        born = prune_to_width(net, probe, value, options["importance"], inputs)
    else:
        born = prune_to_budget(net, probe, key, value, options["importance"], inputs)
    config = ModelConfig(arch=PRUNED_ARCH, arch_kwargs=pruned_arch_kwargs(teacher.config.arch, teacher.config.arch_kwargs, born),
                         input=teacher.input_format, class_names=list(teacher.config.class_names),
                         born_from=birth_record(teacher.fingerprint(), born))
    return Classifier(born.net, config) if from_teacher else Classifier.from_config(config)


def build_student(student: str, teacher: Classifier, width: float = 1.0, seed: int = 0,
                  from_teacher: bool = False, cuts: str | list[str] = "blocks",
                  images: torch.Tensor | None = None) -> Classifier:
    """A zoo architecture (``NAME[:KEY=VALUE,...]``; ``width`` unless the spec gives one) sized
    to the teacher's input and classes, the teacher thinned or pruned (``teacher:...``, see
    :func:`teacher_student`), a model source (given the teacher's number of classes unless its spec
    sets them), or an existing model directory / FILE.py:factory used as the starting point;
    classes must match the teacher's. ``from_teacher``: a zoo student that is the teacher's
    architecture thinner inside its blocks starts from the teacher's most important channels, and
    one that is narrower or has fewer blocks per stage is the teacher pruned to its shapes
    (``importance=`` in the spec: the criterion); ``sparsity=S`` in the spec then zeroes the
    smallest weights. ``images`` ([0, 1] synthetic images): the Taylor criterion's, and a student
    started from the teacher re-estimates its batch-norm statistics on them (``recalibrate=false``
    in the spec: not)."""
    fmt = teacher.input_format
    set_seed(seed)  # initial weights come from the global RNG
    if student == TEACHER_STUDENT or student.startswith(TEACHER_STUDENT + ":"):
        model = teacher_student(student, teacher, cuts, from_teacher, images)
        return recalibrated(model, images) if from_teacher and teacher_size(student)[2]["recalibrate"] else model
    parsed = parse_zoo_spec(student)
    if parsed is not None:
        name, kwargs = parsed
        sparsity = float(kwargs.pop("sparsity", 0.0))
        options = birth_options(kwargs, student)
        config = ModelConfig(
            arch=name,
            arch_kwargs={"width": width, **kwargs, "in_channels": fmt.channels, "num_classes": teacher.num_classes},
            input=fmt,
            class_names=list(teacher.config.class_names),
        )
        try:
            model = Classifier.from_config(config)
        except TypeError as error:
            raise SynthkdError(f"{student!r}: {error}; write {ZOO_SPEC_GRAMMAR}") from error
        born = from_teacher and config.arch == teacher.config.arch
        if born and is_thinning_of(model, teacher):
            copy_from_teacher(model.net, teacher.net)
        elif born and is_narrower_copy(model.net, unwrap(teacher.net)):
            inputs = None if images is None else network_inputs(teacher, images)
            born_net = born_like(model.net, unwrap(teacher.net).cpu(), format_probe(teacher.input_format),
                                 options["importance"], inputs)
            model.config.born_from = birth_record(teacher.fingerprint(), born_net)
        else:
            born = False
        if born and options["recalibrate"]:
            recalibrated(model, images)
        if sparsity:
            if not 0 < sparsity < 1:
                raise SynthkdError(f"sparsity must be in (0, 1) in {student!r}")
            hold_at_zero(prune_by_magnitude(model.net, sparsity))  # the gradient hooks last as long as the model
        return model
    if Path(student).is_dir():
        model = load_model(student)
    elif is_source_spec(student):
        key = classes_kwarg(student)
        made = open_source(student, {key: teacher.num_classes} if key and key not in parse_source(student)[2] else {})
        model = Classifier(made.net, ModelConfig(arch=made.arch, arch_kwargs=made.arch_kwargs, input=fmt,
                                                 class_names=list(teacher.config.class_names)))
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


def recalibrated(model: Classifier, images: torch.Tensor | None) -> Classifier:
    """``model`` with batch-norm statistics re-estimated on ``images`` (unchanged without images)."""
    if images is not None:
        recalibrate_batchnorm(model, images)
    return model


def sample_images(dataset: Dataset, count: int = 1024) -> torch.Tensor:
    """The first ``count`` images of a synthetic set (or real dataset): what a student born from the
    teacher is calibrated on."""
    return torch.stack([dataset[i].images.float() for i in range(min(count, len(dataset)))])


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


def is_dataset_spec(data: str | os.PathLike) -> bool:
    """Whether ``data`` names a real dataset (``fashion-mnist:train``) rather than a synthetic set directory."""
    return not Path(data).exists() and ":" in str(data)


def open_training_data(data: str | os.PathLike, teacher: Classifier, accelerator: Accelerator,
                       stored_targets: bool = False) -> Dataset:
    """A synthetic set directory, or a real dataset spec (for the KD-on-real-data reference);
    a synthetic set must have the teacher's classes. ``stored_targets``: its logits will be the
    targets, so it must be a synthetic set made by this very teacher."""
    if is_dataset_spec(data):
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
    """Evaluate teacher and student, save the student with its ``metrics.json`` (and drop the training state)."""
    if evaluation is not None:
        metrics["eval_dataset"] = eval_dataset
        metrics["student"] = evaluate(student, evaluation, accelerator)
        metrics["teacher"] = evaluate(teacher, evaluation, accelerator)
        metrics["gap"] = metrics["teacher"]["accuracy"] - metrics["student"]["accuracy"]
    if accelerator.is_main_process:
        student.save_pretrained(out)
        atomic_write_json(Path(out) / "metrics.json", metrics)
        discard_training_state(out)
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
    resumable = {"settings": settings.to_dict(), "data": data_fingerprint(data, training_data),
                 "teacher": teacher.fingerprint(), "student": student.fingerprint()}
    if settings.teacher_views:
        training_data = LabelledViews(training_data, teacher, objective.augment, settings.teacher_views, seed)
    views_seconds = time.perf_counter() - started
    history = fit(student, training_data, objective, train, accelerator, evaluation, description="distill",
                  checkpoint_dir=out, checkpoint_inputs=resumable)
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
    return f"{data}:{len(dataset)}"  # a dataset spec (its files are the installed data set's)


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
    started, cpu_started = time.perf_counter(), time.process_time()
    distiller = NeighbourhoodDistiller(teacher, student, config, accelerator)
    report = distiller.train(training_data, out, data_fingerprint(data, training_data))
    student = distiller.merge()
    metrics: dict[str, Any] = {
        "mode": "neighbourhood", "inputs": inputs, "data": str(data), "num_training_images": len(training_data),
        "config": asdict(config), "cuts": distiller.cuts, **report,
        "neighbourhood_seconds": time.perf_counter() - started, "num_processes": accelerator.num_processes,
        "neighbourhood_cpu_seconds": time.process_time() - cpu_started,  # this process's
    }
    if evaluation is not None:
        metrics["merged"] = evaluate(student, evaluation, accelerator)
    if finetune is not None and finetune.epochs > 0:
        metrics.update(kd_finetune(teacher, student, training_data, config, finetune, accelerator, evaluation))
    metrics["distill_seconds"] = metrics["neighbourhood_seconds"] + metrics.get("finetune_seconds", 0.0)
    result = finish(teacher, student, metrics, out, evaluation, eval_dataset, accelerator)
    if config.cache_dir is None and accelerator.is_main_process:
        shutil.rmtree(cache_directory(config, out), ignore_errors=True)  # the default cache is scratch space
    return result


def plan_distillation(
    teacher: Classifier,
    student: StudentSettings,
    num_images: int,
    out: str | os.PathLike,
    settings: DistillSettings,
    seed: int = 0,
    num_ranks: int = 1,
    accelerator: Accelerator | None = None,
) -> dict[str, Any]:
    """What :func:`distill` in neighbourhood mode would cost on ``num_images`` images over
    ``num_ranks`` ranks (:func:`synthkd.neighbourhood_plan.plan_neighbourhoods`); trains and
    writes nothing."""
    from synthkd.neighbourhood_plan import plan_neighbourhoods

    if settings.mode != "neighbourhood":
        raise SynthkdError(f"--plan sizes neighbourhood distillation; this run distills in mode {settings.mode!r}")
    accelerator = accelerator or make_accelerator()
    distiller = NeighbourhoodDistiller(teacher, student_for(student, settings, teacher, seed), settings.neighbourhoods(seed),
                                       accelerator, owned=[])
    return plan_neighbourhoods(distiller, num_images, num_ranks, out, settings.finetune_epochs)


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
    images = None
    if settings.init == "teacher" and inputs == "images":
        images = sample_images(load_dataset(str(data)) if is_dataset_spec(data) else SyntheticDataset(data))
    student_model = student_for(student, settings, teacher, seed, images)
    if settings.mode == "neighbourhood" and student_model.input_format.shape != teacher.input_format.shape:
        raise SynthkdError(
            f"the student {student.arch} takes inputs of shape {student_model.input_format.shape} and the teacher "
            f"{teacher.input_format.shape}; neighbourhood mode feeds the student's pieces the teacher's activations, so "
            "give a student with the teacher's input format, or use --mode e2e")
    if settings.mode == "e2e":
        return distill_e2e(teacher, student_model, data, out, settings, seed, eval_dataset, accelerator)
    return distill_neighbourhood(teacher, student_model, data, out, settings.neighbourhoods(seed), settings.finetune(seed),
                                 eval_dataset, accelerator, inputs)
