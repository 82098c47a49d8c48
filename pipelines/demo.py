"""``synthkd demo``: the whole data-free path on a small built-in setting, in minutes.

Teacher on the real training split -> activation inversion -> e2e KD on the synthetic images
only -> teacher vs student accuracy on the real test split. Finished stages are reused when
the demo is run again with the same output directory.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from synthkd.accelerator import make_accelerator
from synthkd.data.kinds.fashion_mnist import FASHION_MNIST_DEFAULT, FASHION_MNIST_ENV
from synthkd.io import atomic_write_json
from synthkd.models import Classifier

from .distill import DistillSettings, StudentSettings, distill
from .generate import GenerateSettings, generate_set
from .train_teacher import TeacherSettings, train_teacher


@dataclass
class DemoSetting:
    """One built-in setting: each stage's settings, plus the size of the synthetic set."""

    dataset: str
    teacher: TeacherSettings
    student: StudentSettings
    num_images: int
    iterations: int
    distill: DistillSettings


def _setting(dataset: str, teacher_epochs: int, num_images: int, distill_epochs: int, flip: bool) -> DemoSetting:
    """resnet8 teacher, resnet8 x0.5 student, 100 inversion steps per batch."""
    return DemoSetting(dataset, TeacherSettings(arch="resnet8", epochs=teacher_epochs, flip=flip),
                       StudentSettings(arch="resnet8", width=0.5), num_images, 100,
                       DistillSettings(mode="e2e", epochs=distill_epochs, flip=flip))


SETTINGS = {
    "digits": _setting("digits", teacher_epochs=30, num_images=1024, distill_epochs=40, flip=False),
    "fashion-mnist": _setting("fashion-mnist", teacher_epochs=3, num_images=2048, distill_epochs=60, flip=True),
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
        teacher, _ = train_teacher(f"{dataset}:train", setting.teacher, teacher_dir, accelerator=accelerator)
    timings["teacher_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    data_dir = out / "synthetic"  # a finished set is verified and reused, an interrupted one resumed
    inversion = GenerateSettings(num_images=setting.num_images, batch_size=256, iterations=setting.iterations,
                                 flip=setting.teacher.flip)
    generate_set(inversion, teacher, data_dir, accelerator=accelerator)
    timings["generate_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    _, metrics = distill(teacher, setting.student, data_dir, out / "student", setting.distill,
                         eval_dataset=f"{dataset}:test", accelerator=accelerator)
    timings["distill_seconds"] = time.perf_counter() - started
    summary = {
        "dataset": dataset,
        "setting": asdict(setting),
        "teacher_accuracy": metrics["teacher"]["accuracy"],
        "student_accuracy": metrics["student"]["accuracy"],
        "gap_points": 100 * metrics["gap"],
        **timings,
        "out": str(out),
    }
    if accelerator.is_main_process:
        atomic_write_json(out / "summary.json", summary)
    return summary
