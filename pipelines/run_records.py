"""The vocabulary of ``synthkd run`` shared by the runner and the report: a stage, the plan's
step for it, the record each stage keeps in ``RUN_DIR/stages/NAME.json`` and the training curves."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from accelerate import Accelerator

from synthkd.io import read_json
from synthkd.models import Classifier, load_model, trusting_code

from .config import RunConfig


@dataclass
class RunContext:
    """What a stage needs: the settings, where to write, and the Accelerator."""

    config: RunConfig
    run_dir: Path
    accelerator: Accelerator

    def teacher(self) -> Classifier:
        """A fresh copy of the teacher (stages attach hooks or move it between devices)."""
        spec = self.config.teacher
        if spec.model is not None:
            return load_model(spec.model, spec.weights, spec.input_shape, spec.mean, spec.std).eval()
        return self._own_model("teacher")

    def student(self) -> Classifier:
        return self._own_model("student")

    def _own_model(self, name: str) -> Classifier:
        """A model this run saved: code it names is trusted where the config names that code."""
        named = {self.config.student.arch, self.config.teacher.model or ""}
        with trusting_code(False, archs=named):
            return Classifier.from_pretrained(self.run_dir / name).eval()


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline. ``execute`` does the work (resuming from the stage's own
    checkpoints) and returns its headline figures; ``outputs`` are cleared when it reruns."""

    name: str
    needs: tuple[str, ...]
    section: Callable[[RunConfig], dict[str, Any]]
    execute: Callable[[RunContext], dict[str, Any]]
    outputs: tuple[str, ...]
    finished: Callable[[Path, RunConfig], bool]
    enabled: Callable[[RunConfig], bool] = lambda config: True
    inputs: Callable[[RunConfig], dict[str, str]] = lambda config: {}


@dataclass
class Step:
    stage: Stage
    action: str  # run | resume | rerun | skip | off
    reason: str
    fingerprint: str | None = None
    section: dict[str, Any] = field(default_factory=dict)
    upstream: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)


def record_path(run_dir: Path, name: str) -> Path:
    return run_dir / "stages" / f"{name}.json"


def read_record(run_dir: Path, name: str) -> dict[str, Any] | None:
    path = record_path(run_dir, name)
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None  # a damaged record: the stage is treated as never run


def training_curves(run_dir: Path, stage: str) -> dict[str, list[dict[str, Any]]]:
    """The per-epoch records the training loop wrote for a stage, by phase."""
    metrics_file = {"teacher": run_dir / "teacher" / "metrics.json", "distill": run_dir / "student" / "metrics.json"}.get(stage)
    if metrics_file is None or not metrics_file.is_file():
        return {}
    metrics = read_json(metrics_file)
    curves = {}
    for key, phase in (("history", stage), ("finetune_history", f"{stage} fine-tune")):
        if metrics.get(key):
            curves[phase] = metrics[key]
    return curves
