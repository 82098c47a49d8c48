"""Stage: make a synthetic set with any generator, into the resumable shard format.

Every rank makes its share of the pending shards. A shard is filled by draws: the generator
makes images for the shard's missing slots, the teacher labels them (soft labels: its logits),
and an optional :class:`Selection` keeps only confident ones and/or each class's share, drawing
again until the shard is full or the tries run out (the shortfall is then filled with the best
rejected images, and the manifest's ``report`` says what was reached per class). Ranks of a
``collective`` generator advance in lockstep (a rank with nothing to draw passes an empty
batch) because it may all-reduce at every step; the others go at their own pace.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from synthkd.accelerator import make_accelerator
from synthkd.data.shards import SyntheticWriter
from synthkd.errors import SynthkdError
from synthkd.generators.base import SyntheticImageGenerator
from synthkd.models import Classifier


@dataclass
class Selection:
    """Which drawn images a shard keeps, judged by the teacher."""

    min_confidence: float = 0.0  # the teacher's softmax probability of its predicted class
    balance: bool = False  # each class gets its planned share of every shard, by the teacher's label
    max_tries: int = 10  # draws per shard before the shortfall is filled with the best rejected images

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_confidence <= 1.0:
            raise SynthkdError(f"--min-confidence must be in [0, 1], got {self.min_confidence}")
        if self.max_tries < 1:
            raise SynthkdError(f"--max-tries must be at least 1, got {self.max_tries}")

    @property
    def active(self) -> bool:
        return self.min_confidence > 0 or self.balance


METHODS = ("inversion", "fast", "diffusion")


def image_generator(
    method: str, teacher: Classifier, loss: dict[str, Any], iterations: int, lr: float, seed: int, batch_size: int,
    fast: dict[str, Any], diffusion: dict[str, Any], competitor: Classifier | None = None,
) -> SyntheticImageGenerator:
    """The image generator of ``method`` (one of :data:`METHODS`) on the teacher's device, built the
    same way for ``synthkd generate`` and ``synthkd run``: the inversion-loss settings ``loss``
    serve inversion and fast; ``fast`` and ``diffusion`` hold their method's options by CLI name."""
    device = next(teacher.parameters()).device
    if method == "fast":
        from synthkd.generators.fast import build_fast_generator

        return build_fast_generator(teacher, loss, competitor, seed, fast)
    if method == "diffusion":
        from synthkd.generators.diffusion import build_diffusion_generator

        return build_diffusion_generator(teacher, device, batch_size, diffusion)
    if method != "inversion":
        raise SynthkdError(f"unknown generation method {method!r}; use one of {', '.join(METHODS)}")
    from synthkd.generators.inversion import ActivationInversion, InversionConfig

    return ActivationInversion(teacher, InversionConfig(iterations=iterations, lr=lr, **loss), competitor)


def teacher_record(teacher: Classifier) -> dict[str, Any]:
    """What a synthetic set records about the teacher that made it."""
    return {
        "fingerprint": teacher.fingerprint(),
        "arch": teacher.config.arch,
        "input_shape": list(teacher.input_format.shape),
        "class_names": list(teacher.config.class_names),
    }


def shard_seed(seed: int, shard_id: int) -> int:
    return seed * 1_000_003 + shard_id


def draw_seed(seed: int, shard_id: int, attempt: int) -> int:
    """The first draw of a shard uses its shard seed; later draws get unrelated seeds."""
    if attempt == 0:
        return shard_seed(seed, shard_id)
    return int(np.random.SeedSequence((seed, shard_id, attempt)).generate_state(1, np.uint64)[0] >> 1)


@torch.no_grad()
def label_with_teacher(teacher: Classifier, images: torch.Tensor) -> torch.Tensor:
    return teacher.eval()(images).float()


class ShardDraws:
    """The slots of one shard and the images kept for them so far."""

    def __init__(self, plan: torch.Tensor, num_classes: int, selection: Selection, aims_at_targets: bool):
        self.plan = plan
        self.selection = selection
        self.aims = aims_at_targets
        self.quota = torch.bincount(plan, minlength=num_classes)
        self.kept: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # image, logits, target
        self.pool_images: torch.Tensor | None = None  # rejected images, the best kept for the shortfall
        self.pool_logits = torch.zeros(0, num_classes)
        self.drawn = torch.zeros(num_classes, dtype=torch.long)  # by the teacher's label
        self.tries = 0

    def missing(self) -> torch.Tensor:
        """The targets of the slots still empty."""
        if self.selection.balance:
            return torch.repeat_interleave(torch.arange(len(self.quota)), self.quota)
        return self.plan[len(self.kept):]

    def request(self) -> torch.Tensor:
        """What to draw next: the missing targets, over-drawn by the acceptance rate so far."""
        missing = self.missing()
        if len(missing) == 0:
            return missing
        rate = len(self.kept) / int(self.drawn.sum()) if self.tries else 1.0
        size = min(len(self.plan), math.ceil(len(missing) / max(rate, 1.0 / len(self.plan))))
        return missing.repeat(math.ceil(size / len(missing)))[:size]

    def offer(self, images: torch.Tensor, logits: torch.Tensor, aimed: torch.Tensor) -> None:
        """Keep what the selection accepts; the rest join the pool of rejected images."""
        self.tries += 1
        confidence, label = logits.softmax(1).max(1)
        self.drawn += torch.bincount(label, minlength=len(self.drawn))
        rejected = []
        for i in range(len(images)):
            if len(self.kept) == len(self.plan) or confidence[i] < self.selection.min_confidence:
                rejected.append(i)
                continue
            if self.selection.balance:
                target = int(label[i])
                if self.quota[target] == 0:
                    rejected.append(i)
                    continue
                self.quota[target] -= 1
            else:
                target = int(aimed[i]) if self.aims else int(label[i])
            self.kept.append((images[i], logits[i], target))
        self._pool(images[rejected], logits[rejected])

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Images, logits and targets of the full shard, and what the selection reached."""
        accepted = torch.bincount(torch.tensor([t for *_, t in self.kept], dtype=torch.long), minlength=len(self.quota))
        filled = torch.zeros_like(accepted)
        for target in self.missing().tolist():  # tries ran out: the best rejected image per slot
            probabilities = self.pool_logits.softmax(1)
            if self.selection.balance:
                best = int(probabilities[:, target].argmax())
            else:
                best = int(probabilities.max(1).values.argmax())
                target = target if self.aims else int(probabilities[best].argmax())
            self.kept.append((self.pool_images[best], self.pool_logits[best], target))
            keep = torch.arange(len(self.pool_images)) != best
            self.pool_images, self.pool_logits = self.pool_images[keep], self.pool_logits[keep]
            filled[target] += 1
        targets = torch.tensor([target for *_, target in self.kept], dtype=torch.long)
        images = torch.stack([image for image, _, _ in self.kept]) if self.kept else torch.zeros(0)
        logits = torch.stack([logit for _, logit, _ in self.kept]) if self.kept else self.pool_logits[:0]
        report = {"accepted": accepted.tolist(), "filled": filled.tolist(), "drawn": self.drawn.tolist(), "tries": self.tries}
        if self.selection.balance or self.aims:  # the plan's share per class means something
            report["wanted"] = torch.bincount(self.plan, minlength=len(self.quota)).tolist()
        return images, logits, targets, report

    def _pool(self, images: torch.Tensor, logits: torch.Tensor) -> None:
        """Keep at most as many rejected images as there are empty slots, the most useful ones."""
        if len(images) == 0:
            return
        self.pool_images = images if self.pool_images is None else torch.cat([self.pool_images, images])
        self.pool_logits = torch.cat([self.pool_logits, logits])
        missing = self.missing()
        if len(self.pool_images) <= len(missing):
            return
        probabilities = self.pool_logits.softmax(1)
        usefulness = (probabilities[:, missing.unique()].max(1).values if self.selection.balance
                      else probabilities.max(1).values)
        best = usefulness.topk(len(missing)).indices
        self.pool_images, self.pool_logits = self.pool_images[best], self.pool_logits[best]


def fill_shard(
    teacher: Classifier,
    generator: SyntheticImageGenerator,
    plan: torch.Tensor,
    seed: int,
    shard: int,
    selection: Selection,
    accelerator: Accelerator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Draw until every slot of ``plan`` is filled by an accepted image, or the tries run out."""
    draws = ShardDraws(plan, teacher.num_classes, selection, generator.aims_at_targets)
    tries = selection.max_tries if selection.active else 1
    for attempt in range(tries):
        request = draws.request()
        pending = torch.tensor([len(request)], device=accelerator.device)
        if generator.collective:
            pending = accelerator.gather(pending).max()
        if int(pending) == 0:
            break
        images = generator.generate(request, seed=draw_seed(seed, shard, attempt))
        if len(request):
            images = images.cpu()
            draws.offer(images, label_with_teacher(teacher, images.to(accelerator.device)).cpu(), request)
    return draws.result()


def generate(
    teacher: Classifier,
    generator: SyntheticImageGenerator,
    num_images: int,
    out: str | os.PathLike,
    batch_size: int = 256,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    selection: Selection | None = None,
    max_rounds: int | None = None,
) -> dict[str, Any] | None:
    """Generate ``num_images`` into ``out``; returns the manifest. Resumes an interrupted run.
    With ``max_rounds`` stop after that many shard rounds (one shard per rank each) and return
    None if shards are left: an interleaved run makes its set a few shards at a time."""
    accelerator = accelerator or make_accelerator()
    selection = selection or Selection()
    teacher.to(accelerator.device)
    config = {**generator.config(), "seed": seed}
    if selection.active:  # recorded only when used, so sets made before selection existed still resume
        config["selection"] = asdict(selection)
    writer = SyntheticWriter(
        out,
        method=generator.method,
        config=config,
        teacher=teacher_record(teacher),
        num_images=num_images,
        num_classes=teacher.num_classes,
        image_shape=teacher.input_format.shape,
        shard_size=batch_size,
        accelerator=accelerator,
    )
    generator.load_state(writer.out_dir)
    pending = writer.pending_shards()
    rounds = len(pending)
    if generator.collective or max_rounds is not None:  # every rank must agree on the rounds
        rounds = int(accelerator.gather(torch.tensor([len(pending)], device=accelerator.device)).max())
    unfinished = max_rounds is not None and max_rounds < rounds
    rounds = min(rounds, max_rounds) if unfinished else rounds
    empty = torch.zeros(0, dtype=torch.long)
    bar = tqdm(total=rounds, desc=f"generate ({generator.method})", disable=not accelerator.is_local_main_process)
    for round_index in range(rounds):
        shard = pending[round_index] if round_index < len(pending) else None
        plan = writer.shard_targets(shard) if shard is not None else empty
        images, logits, targets, report = fill_shard(
            teacher, generator, plan, seed, shard if shard is not None else 0, selection, accelerator)
        if shard is not None:
            writer.write_shard(shard, images, logits, targets, report if selection.active else None)
        if accelerator.is_main_process:
            generator.save_state(writer.out_dir)
        bar.update(1)
    bar.close()
    if unfinished:
        accelerator.wait_for_everyone()
        return None
    return writer.finalize()
