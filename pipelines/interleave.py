"""Stage: make synthetic data while the student trains on it (Fast-DFKD style).

Each epoch first makes ``batches_per_round`` new shards per rank into the synthetic-set
directory (the student being trained is the generator's competitor), then trains one epoch of
end-to-end KD on every shard made so far. The set is written in the ordinary resumable shard
format, so a stopped run resumes (shards, generator state and the student's checkpoint are all
on disk) and the finished set can be reused by ``synthkd distill --data``.

An epoch always has ``num_images / batch_size`` steps, whatever has been made so far: indices
wrap around the images that exist, so the learning-rate schedule and the checkpointing of
:func:`synthkd.training.fit` apply unchanged. With the ``replay`` boundary technique a share of
every epoch's items are the newest round's images and the rest a bounded memory of older ones.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from torch.utils.data import Dataset

from synthkd.accelerator import make_accelerator
from synthkd.data import SyntheticBatch, load_dataset
from synthkd.data.reader import is_synthetic_dir, load_written_shards
from synthkd.errors import SynthkdError
from synthkd.generators.boundary import BoundarySettings, method_problems
from synthkd.generators.diagnostic import diagnose_set
from synthkd.generators.fast import FastSettings
from synthkd.generators.inversion import InversionLossSettings, competition_weight_setting
from synthkd.generators.registry import GENERATORS
from synthkd.models import Classifier
from synthkd.settings import Settings, setting
from synthkd.training import fit

from .distill import DistillSettings, KDObjective, finish
from .generate import GenerateSettings, generate


@dataclass
class InterleaveSettings(Settings):
    """``distill --synthesize``: make the set into --data while the student trains on it."""

    synthesize: Literal["none", "fast"] = setting(
        "none", help="fast: make new batches into --data with the fast generator while the student trains (e2e), "
                     "the student being the competitor; resumable, the set reusable.")
    num_images: int = setting(24576, positive=True, help="--synthesize: the size of the set made into --data.")
    gen_batch_size: int = setting(256, positive=True, help="--synthesize: images per generated batch (and shard).")
    batches_per_round: int = setting(2, positive=True, help="--synthesize: new batches per rank before each epoch.")
    competition_weight: float | None = competition_weight_setting()
    fast: FastSettings = setting(default_factory=FastSettings, help="--synthesize fast")
    boundary: BoundarySettings = setting(default_factory=BoundarySettings,
                                         help="techniques that aim samples at the decision boundaries")
    objective: InversionLossSettings = setting(default_factory=InversionLossSettings, cli=False,
                                               help="the generator's inversion objective (its competition weight is "
                                                    "the one above); API only: its flip would clash with distill's")

    @property
    def enabled(self) -> bool:
        return self.synthesize != "none"

    def cross_problems(self) -> list[tuple[str, str]]:
        if not self.boundary.active:
            return []
        if not self.enabled:
            return [("boundary.techniques", "are for the data distill makes: add --synthesize fast")]
        generator_side = BoundarySettings(techniques=self.boundary.generator_techniques())
        techniques = GENERATORS.get(self.synthesize).techniques
        return [("boundary.techniques", why) for why in method_problems(generator_side, self.synthesize, techniques)]

    def generate_settings(self) -> GenerateSettings:
        """The set being made, as the generate stage describes it (the generator's techniques only)."""
        boundary = BoundarySettings(**{**asdict(self.boundary), "techniques": self.boundary.generator_techniques()})
        objective = {**asdict(self.objective), "competition_weight": self.competition_weight}
        return GenerateSettings(method=self.synthesize, num_images=self.num_images, batch_size=self.gen_batch_size,
                                fast=self.fast, boundary=boundary, **objective)


class GrowingSyntheticSet(Dataset):
    """The shards of a set being made, seen as ``length`` items (indices wrap around what exists).

    With ``replay_newest`` > 0 (the ``replay`` technique), while new shards keep coming, the first
    ``replay_newest`` share of the items are the newest round's images and the rest the
    ``replay_size`` images made just before them (a memory bank of older samples); the loader
    shuffles both. Once generation has stopped, every image counts alike again."""

    def __init__(self, directory: str | os.PathLike, length: int, replay_newest: float = 0.0, replay_size: int = 0):
        self.directory = Path(directory)
        self.length = length
        self.replay_newest = replay_newest
        self.replay_size = replay_size
        self.shards: dict[str, dict[str, torch.Tensor]] = {}
        self.images = torch.zeros(0)
        self.logits = torch.zeros(0)
        self.newest = 0  # images of the last round that added shards, at the end of ``images``

    def refresh(self) -> int:
        """Read the shards written since the last call; returns how many images exist."""
        before = set(self.shards)
        load_written_shards(self.directory, self.shards)
        names = sorted(self.shards)
        if not names:
            raise SynthkdError(f"{self.directory} holds no shard after a generation round; rerun to resume it")
        new = set(names) - before if before else set()  # the first round has nothing to replay
        # newest last, so the replayed memory is the images just before them
        ordered = [n for n in names if n not in new] + [n for n in names if n in new]
        self.images = torch.cat([self.shards[n]["images"] for n in ordered])
        self.logits = torch.cat([self.shards[n]["logits"] for n in ordered])
        self.newest = sum(len(self.shards[n]["images"]) for n in new)
        return len(self.images)

    def __len__(self) -> int:
        return self.length

    def source(self, index: int) -> int:
        """The image behind item ``index``."""
        total = len(self.images)
        older = total - self.newest
        if self.replay_newest <= 0 or self.newest == 0 or older == 0:
            return index % total
        newest_items = round(self.replay_newest * self.length)
        if index < newest_items:
            return older + index % self.newest
        memory = min(older, self.replay_size)
        return older - memory + (index - newest_items) % memory

    def __getitem__(self, index: int) -> SyntheticBatch:
        index = self.source(index)
        return SyntheticBatch(self.images[index], self.logits[index], -1)  # KD reads images only


def distill_interleaved(
    teacher: Classifier,
    student: Classifier,
    data: str | os.PathLike,
    out: str | os.PathLike,
    synthesis: InterleaveSettings,
    settings: DistillSettings | None = None,
    seed: int = 0,
    eval_dataset: str | None = None,
    accelerator: Accelerator | None = None,
) -> tuple[Classifier, dict[str, Any]]:
    """Alternate "make ``batches_per_round`` shards into ``data``" and "one KD epoch on all
    shards so far" for ``train.epochs`` epochs (generation stops once ``num_images`` exist); the
    student being trained is the generator's competitor. Saves the student to ``out`` with
    ``metrics.json``."""
    synthesis.check()
    accelerator = accelerator or make_accelerator()
    settings = settings or DistillSettings()
    train = settings.training(seed)
    evaluation = load_dataset(eval_dataset) if eval_dataset else None
    teacher.to(accelerator.device)
    student.to(accelerator.device)
    wanted = synthesis.generate_settings()
    generator = GENERATORS.get(wanted.method).build(wanted, teacher, student, seed)
    num_images, batches_per_round = wanted.num_images, synthesis.batches_per_round
    objective = KDObjective(teacher, settings).to(accelerator.device)
    replay = synthesis.boundary.on("replay")
    growing = GrowingSyntheticSet(data, num_images, synthesis.boundary.replay_newest if replay else 0.0,
                                  synthesis.boundary.replay_size)
    seconds = {"generate": 0.0}
    made: list[int] = []

    def make_more(epoch: int) -> None:
        started = time.perf_counter()
        generate(teacher, generator, num_images, data, wanted.batch_size, seed, accelerator, max_rounds=batches_per_round)
        seconds["generate"] += time.perf_counter() - started
        made.append(growing.refresh())

    started = time.perf_counter()
    history = fit(student, growing, objective, train, accelerator, evaluation, description="distill (interleaved)",
                  checkpoint_dir=out, on_epoch_start=make_more)
    for record, count in zip(history[len(history) - len(made):], made):
        record["synthetic_images"] = count
    metrics: dict[str, Any] = {
        "mode": "e2e", "synthesize": generator.method, "data": str(data), "num_images": num_images,
        "generator": generator.config(), "batches_per_round": batches_per_round, "train": asdict(train),
        "temperature": settings.temperature, "mixup": settings.mixup, "history": history,
        "generate_seconds": seconds["generate"], "total_seconds": time.perf_counter() - started,
        "num_processes": accelerator.num_processes,
    }
    if synthesis.boundary.active:
        metrics["boundary"] = synthesis.boundary.record()
    metrics["distill_seconds"] = metrics["total_seconds"] - metrics["generate_seconds"]
    student, metrics = finish(teacher, student, metrics, out, evaluation, eval_dataset, accelerator)
    if accelerator.is_main_process and is_synthetic_dir(Path(data)):  # the set is finished
        metrics["diagnostic"] = diagnose_set(data, teacher, student)
    accelerator.wait_for_everyone()
    return student, metrics
