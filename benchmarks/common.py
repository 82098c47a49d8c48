"""Shared pieces of the benchmark scripts: the standard setting, tables, JSON output."""

from __future__ import annotations

import logging
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from synthkd.accelerator import show_log

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SYNTHKD_BENCH_CACHE", REPO / ".cache" / "benchmarks"))
show_log(logging.INFO)  # the stages' progress lines (one per epoch), as the command line shows them


def load_setting(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The standard setting from configs/fashion_mnist.yaml, validated and with the defaults of
    the `synthkd run` schema filled in."""
    from synthkd.pipelines.config import load_config

    return load_config(path or REPO / "configs" / "fashion_mnist.yaml").to_dict()


SHIPPED_TEACHER = REPO / "benchmarks" / "standard_teacher"  # the standard teacher, committed (README there)
RETRAIN_ENV = "SYNTHKD_RETRAIN_TEACHER"  # =1: every benchmark trains its teacher instead of using the shipped one


def shipped_teacher_fits(config: dict[str, Any], epochs: int) -> bool:
    """Whether the committed teacher is the one the setting asks for (architecture, width, epochs)."""
    import json

    record = SHIPPED_TEACHER / "teacher.json"
    if not (SHIPPED_TEACHER / "model.safetensors").is_file() or not record.is_file():
        return False
    made = json.loads(record.read_text())
    teacher = config["teacher"]
    return (made.get("arch"), made.get("width"), made.get("epochs")) == (teacher["arch"], teacher["width"], epochs)


def standard_teacher(config: dict[str, Any], epochs: int, cache: Path, timings: dict[str, float], retrain: bool = False):
    """The resnet20 teacher of the standard setting: the one shipped in benchmarks/standard_teacher
    (seconds on a fresh machine), unless ``retrain`` (or SYNTHKD_RETRAIN_TEACHER=1) or the setting
    asks for another; then the one in the cache, trained there on first use."""
    from synthkd.models import Classifier
    from synthkd.pipelines.train_teacher import TeacherSettings, train_teacher

    retrain = retrain or os.environ.get(RETRAIN_ENV) == "1"
    if not retrain and shipped_teacher_fits(config, epochs):
        return Classifier.from_pretrained(SHIPPED_TEACHER)
    teacher = config["teacher"]
    directory = cache / f"teacher-{teacher['arch']}-w{teacher['width']}-e{epochs}"
    if (directory / "model.safetensors").is_file():
        return Classifier.from_pretrained(directory)
    with timed(timings, "teacher_seconds"):
        model, _ = train_teacher(teacher["dataset"], TeacherSettings(arch=teacher["arch"], width=teacher["width"], epochs=epochs),
                                 directory)
    return model


def standard_synthetic(config: dict[str, Any], teacher, num_images: int, iterations: int, cache: Path,
                       timings: dict[str, float]) -> Path:
    """The inverted synthetic set of the standard setting, kept in the cache (resumes if stopped)."""
    from synthkd.pipelines.generate import GenerateSettings, generate_set

    gen = config["generate"]
    directory = cache / (f"synthetic-{teacher.fingerprint()}-n{num_images}-it{iterations}-b{gen['batch_size']}-lr{gen['lr']}")
    from synthkd.data.reader import is_synthetic_dir

    if is_synthetic_dir(directory):
        timings["generate_seconds (cached, not timed)"] = 0.0
        return directory
    with timed(timings, "generate_seconds"):
        inversion = GenerateSettings(num_images=num_images, batch_size=gen["batch_size"], iterations=iterations,
                                     lr=gen["lr"])
        generate_set(inversion, teacher, directory)
    return directory


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(k, "")) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print(f"\n{title}")
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_json(path: str | os.PathLike | None, data: dict[str, Any]) -> None:
    if path is None:
        return
    from synthkd.io import atomic_write_json

    atomic_write_json(path, {**data, "environment": environment(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"\nwrote {path}")


@contextmanager
def timed(record: dict[str, float], key: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    record[key] = time.perf_counter() - started
