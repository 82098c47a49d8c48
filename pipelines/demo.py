"""``synthkd demo``: the whole data-free path on a small built-in setting, in minutes.

Teacher on the real training split -> activation inversion -> e2e KD on the synthetic images
only -> teacher vs student accuracy on the real test split. Finished stages are reused when
the demo is run again with the same output directory.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from synthkd.accelerator import make_accelerator
from synthkd.data.datasets import FASHION_MNIST_DEFAULT, FASHION_MNIST_ENV
from synthkd.io import atomic_write_json
from synthkd.models import Classifier
from synthkd.training import TrainConfig

from .distill import build_student, distill_e2e
from .generate import GenerateSettings, generate_set
from .train_teacher import train_teacher


@dataclass
class DemoSetting:
    dataset: str
    teacher_arch: str
    teacher_epochs: int
    student_arch: str
    student_width: float
    num_images: int
    iterations: int
    distill_epochs: int
    flip: bool


SETTINGS = {
    "digits": DemoSetting("digits", "resnet8", 30, "resnet8", 0.5, 1024, 100, 40, flip=False),
    "fashion-mnist": DemoSetting("fashion-mnist", "resnet8", 3, "resnet8", 0.5, 2048, 100, 60, flip=True),
}


def fashion_mnist_installed() -> bool:
    root = Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DEFAULT))
    return any((root / name).exists() for name in ("t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte"))


def run_demo(out: str | os.PathLike, dataset: str = "auto", accelerator: Accelerator | None = None) -> dict[str, Any]:
    accelerator = accelerator or make_accelerator()
    if dataset == "auto":
        dataset = "fashion-mnist" if fashion_mnist_installed() else "digits"
    setting = SETTINGS[dataset]
    out = Path(out)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    teacher_dir = out / "teacher"
    if (teacher_dir / "model.safetensors").is_file():
        teacher = Classifier.from_pretrained(teacher_dir)
    else:
        teacher, _ = train_teacher(
            f"{dataset}:train", setting.teacher_arch, teacher_dir, train=TrainConfig(epochs=setting.teacher_epochs),
            flip=setting.flip, accelerator=accelerator,
        )
    timings["teacher_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    data_dir = out / "synthetic"  # a finished set is verified and reused, an interrupted one resumed
    inversion = GenerateSettings(num_images=setting.num_images, batch_size=256, iterations=setting.iterations,
                                 flip=setting.flip)
    generate_set(inversion, teacher, data_dir, accelerator=accelerator)
    timings["generate_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    student = build_student(setting.student_arch, teacher, setting.student_width)
    _, metrics = distill_e2e(
        teacher, student, data_dir, out / "student", TrainConfig(epochs=setting.distill_epochs, lr=0.05),
        flip=setting.flip, eval_dataset=f"{dataset}:test", accelerator=accelerator,
    )
    timings["distill_seconds"] = time.perf_counter() - started
    summary = {
        "dataset": dataset,
        "setting": setting.__dict__,
        "teacher_accuracy": metrics["teacher"]["accuracy"],
        "student_accuracy": metrics["student"]["accuracy"],
        "gap_points": 100 * metrics["gap"],
        **timings,
        "out": str(out),
    }
    if accelerator.is_main_process:
        atomic_write_json(out / "summary.json", summary)
    return summary
