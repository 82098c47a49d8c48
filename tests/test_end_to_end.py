"""The whole data-free path on digits: teacher -> activation inversion -> KD on synthetic images
only, then the student's accuracy on the real test split. Then the demo, reusing those stages."""

from __future__ import annotations

import json
import shutil

import pytest

from synthkd.errors import SynthkdError
from synthkd.data.reader import SyntheticDataset
from synthkd.generators.inversion import ActivationInversion, InversionSettings
from synthkd.pipelines.demo import run_demo
from synthkd.pipelines.distill import DistillSettings, build_student, distill_e2e
from synthkd.pipelines.generate import generate
from synthkd.pipelines.train_teacher import TeacherSettings, train_teacher


@pytest.mark.slow
def test_data_free_distillation_on_digits(tmp_path, accelerator):
    # Calibration (2-core CPU, one thread, seeds 0-3): teacher 0.984-0.996, student 0.91-0.92
    # in ~8 s; flips in distillation help even on digits (the teacher labels every view).
    teacher, teacher_metrics = train_teacher(
        "digits:train", TeacherSettings(arch="resnet8", width=1.0, epochs=15, flip=False), tmp_path / "teacher", seed=0,
        eval_dataset="digits:test", accelerator=accelerator,
    )
    assert teacher_metrics["eval"]["accuracy"] >= 0.95

    generator = ActivationInversion(teacher, InversionSettings(iterations=50, flip=False))
    manifest = generate(teacher, generator, 256, tmp_path / "synthetic", batch_size=128, seed=0,
                        accelerator=accelerator)
    assert manifest["num_images"] == 256 and manifest["counts_per_class"] == [26] * 6 + [25] * 4

    student = build_student("resnet8", teacher, width=0.5)
    student, metrics = distill_e2e(
        teacher, student, tmp_path / "synthetic", tmp_path / "student",
        DistillSettings(epochs=25, lr=0.05, batch_size=32, flip=True), seed=0,
        eval_dataset="digits:test", accelerator=accelerator,
    )
    student_accuracy = metrics["student"]["accuracy"]
    assert metrics["teacher"]["accuracy"] == pytest.approx(teacher_metrics["eval"]["accuracy"])
    # Chance is 0.1; the student never saw a real image.
    assert student_accuracy >= 0.7, metrics["student"]
    assert min(metrics["student"]["per_class"].values()) > 0.2, metrics["student"]["per_class"]
    assert metrics["history"][-1]["loss"] < metrics["history"][0]["loss"]
    assert json.loads((tmp_path / "student" / "metrics.json").read_text())["student"]["accuracy"] == student_accuracy

    # The demo reuses a finished teacher, and checks a synthetic set already in its layout against
    # its own settings: this one was made with others, so it says which and rewrites nothing.
    demo = tmp_path / "demo"
    shutil.copytree(tmp_path / "teacher", demo / "teacher")
    shutil.copytree(tmp_path / "synthetic", demo / "synthetic")
    kept = {p.name: p.stat().st_ino for p in [*(demo / "teacher").iterdir(), *(demo / "synthetic").glob("*.*")]}
    with pytest.raises(SynthkdError, match="num_images"):
        run_demo(demo, "digits", accelerator=accelerator)
    for path in [*(demo / "teacher").iterdir(), *(demo / "synthetic").glob("*.*")]:
        assert path.stat().st_ino == kept[path.name], f"{path} was rewritten"
    assert len(SyntheticDataset(demo / "synthetic")) == 256
