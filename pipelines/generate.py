"""Stage: make a synthetic set with any generator, into the resumable shard format.

Every rank makes its share of the pending shards; ranks advance in lockstep (a rank with no
shard left passes an empty batch) because a generator may all-reduce at every step.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from synthkd.accelerator import make_accelerator
from synthkd.generators.base import SyntheticImageGenerator
from synthkd.data.shards import SyntheticWriter
from synthkd.models import Classifier


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


@torch.no_grad()
def label_with_teacher(teacher: Classifier, images: torch.Tensor) -> torch.Tensor:
    return teacher.eval()(images).float()


def generate(
    teacher: Classifier,
    generator: SyntheticImageGenerator,
    num_images: int,
    out: str | os.PathLike,
    batch_size: int = 256,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    max_rounds: int | None = None,
) -> dict[str, Any] | None:
    """Generate ``num_images`` into ``out``; returns the manifest. Resumes an interrupted run.
    With ``max_rounds`` stop after that many shard rounds (one shard per rank each) and return
    None if shards are left: an interleaved run makes its set a few shards at a time."""
    accelerator = accelerator or make_accelerator()
    teacher.to(accelerator.device)
    writer = SyntheticWriter(
        out,
        method=generator.method,
        config={**generator.config(), "seed": seed},
        teacher=teacher_record(teacher),
        num_images=num_images,
        num_classes=teacher.num_classes,
        image_shape=teacher.input_format.shape,
        shard_size=batch_size,
        accelerator=accelerator,
    )
    generator.load_state(writer.out_dir)
    pending = writer.pending_shards()
    rounds = int(accelerator.gather(torch.tensor([len(pending)], device=accelerator.device)).max())
    unfinished = max_rounds is not None and max_rounds < rounds
    rounds = min(rounds, max_rounds) if unfinished else rounds
    empty = torch.zeros(0, dtype=torch.long)
    bar = tqdm(total=rounds, desc=f"generate ({generator.method})", disable=not accelerator.is_local_main_process)
    for round_index in range(rounds):
        shard = pending[round_index] if round_index < len(pending) else None
        targets = writer.shard_targets(shard) if shard is not None else empty
        images = generator.generate(targets, seed=shard_seed(seed, shard if shard is not None else 0))
        if shard is not None:
            images = images.cpu()
            logits = label_with_teacher(teacher, images.to(accelerator.device)).cpu()
            writer.write_shard(shard, images, logits, targets)
        if accelerator.is_main_process:
            generator.save_state(writer.out_dir)
        bar.update(1)
    bar.close()
    if unfinished:
        accelerator.wait_for_everyone()
        return None
    return writer.finalize()
