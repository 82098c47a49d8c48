"""What Accelerate is told reaches it: the mixed precision `accelerate launch` / `accelerate
config` set (ACCELERATE_MIXED_PRECISION) unless a flag overrides it, and the trackers, which the
loops write to live, epoch by epoch and shard by shard, not after the fact; and the log's -v/-q."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO, subprocess_env
from synthkd.cli import main

pytest.importorskip("tensorboard")


def scalars(directory: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return events


def synthkd(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synthkd", *args], cwd=REPO, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=180)


def test_accelerate_mixed_precision_reaches_the_accelerator_unless_a_flag_overrides_it(teacher_dir):
    evaluate = ["-v", "evaluate", "--model", str(teacher_dir), "--dataset", "digits:test", "--json"]
    from_accelerate = synthkd(*evaluate, ACCELERATE_MIXED_PRECISION="bf16")  # what `accelerate launch` sets
    assert from_accelerate.returncode == 0, from_accelerate.stderr
    assert "mixed precision bf16" in from_accelerate.stderr  # the Accelerator's own resolved state
    overridden = synthkd(*evaluate, "--mixed-precision", "no", ACCELERATE_MIXED_PRECISION="bf16")
    assert overridden.returncode == 0 and "mixed precision no" in overridden.stderr, overridden.stderr
    # bf16 autocast really ran: the logits moved a little, the accuracy hardly
    bf16, fp32 = json.loads(from_accelerate.stdout), json.loads(overridden.stdout)
    assert bf16["accuracy"] == pytest.approx(fp32["accuracy"], abs=0.02)


def test_a_run_config_leaves_precision_to_accelerate_and_records_what_it_chose(tmp_path):
    dry = ["run", "configs/digits_quick.yaml", "--dry-run", f"out={tmp_path / 'run'}"]
    assert "\nmixed_precision: bf16\n" in synthkd(*dry, ACCELERATE_MIXED_PRECISION="bf16").stdout
    assert "\nmixed_precision: 'no'\n" in synthkd(*dry, "mixed_precision='no'", ACCELERATE_MIXED_PRECISION="bf16").stdout


def test_distill_sends_each_epoch_to_the_tracker_as_it_ends(tmp_path, teacher_dir, synthetic_dir):
    out = tmp_path / "student"
    result = CliRunner().invoke(main, [
        "distill", "--teacher", str(teacher_dir), "--data", str(synthetic_dir), "--student", "resnet8",
        "--student-width", "0.25", "--epochs", "3", "--batch-size", "16", "--eval-dataset", "digits:test",
        "--tracker", "tensorboard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "distill: epoch 1, loss" in result.output  # the log, at INFO by default
    history = json.loads((out / "metrics.json").read_text())["history"]
    events = scalars(out / "trackers" / "distill")
    assert {"distill/loss", "distill/eval_accuracy", "distill/seconds"} <= set(events.Tags()["scalars"])
    loss = events.Scalars("distill/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    # Live, not replayed: between the records of two epochs the whole later epoch trained. A replay
    # after training would write all three within a moment of each other.
    for earlier, later, record in zip(loss, loss[1:], history[1:]):
        assert later.wall_time - earlier.wall_time >= record["seconds"] * 0.999


def test_generate_sends_each_shard_to_the_tracker_and_q_quiets_the_log(tmp_path, teacher_dir):
    out = tmp_path / "set"
    result = CliRunner().invoke(main, [
        "-q", "generate", "--teacher", str(teacher_dir), "--num-images", "24", "--batch-size", "8", "--iterations", "2",
        "--tracker", "tensorboard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 24 images in 3 shards" in result.output  # results still print under -q
    assert "generate (inversion)" not in result.output  # no progress bar, no shard line
    events = scalars(out / "trackers" / "generate")
    assert [e.step for e in events.Scalars("generate/inversion/images")] == [1, 2, 3]
    assert all(e.value == 8 for e in events.Scalars("generate/inversion/images"))
    assert all(0 <= e.value <= 1 for e in events.Scalars("generate/inversion/agreement"))


def test_run_sends_every_stage_live_to_one_tracker_run(tmp_path, teacher_dir):
    from test_run import tiny_setting, write_config

    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "tiny.yaml", tiny_setting(teacher_dir, run_dir, epochs=3))
    result = CliRunner().invoke(main, ["run", str(config), "--quiet", "--tracker", "tensorboard"])
    assert result.exit_code == 0, result.output
    events = scalars(run_dir / "trackers" / "synthkd-run")
    assert {"generate/inversion/images", "distill/loss"} <= set(events.Tags()["scalars"])
    history = json.loads((run_dir / "student" / "metrics.json").read_text())["history"]
    loss = events.Scalars("distill/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    for earlier, later, record in zip(loss, loss[1:], history[1:]):
        assert later.wall_time - earlier.wall_time >= record["seconds"] * 0.999
    assert "[distill] done" in (run_dir / "run.log").read_text()  # the stage lines, logged


def test_a_tracker_whose_package_is_missing_is_one_line(tmp_path, teacher_dir, synthetic_dir):
    from accelerate.tracking import get_available_trackers

    available = {str(getattr(a, "value", a)) for a in get_available_trackers()}
    missing = next((t for t in ("wandb", "mlflow", "aim", "comet_ml") if t not in available), None)
    if missing is None:
        pytest.skip("every tracker tried is installed")
    result = CliRunner().invoke(main, ["distill", "--teacher", str(teacher_dir), "--data", str(synthetic_dir),
                                       "--epochs", "1", "--tracker", missing, "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and f"pip install {missing}" in result.output, result.output


def test_a_redirected_log_has_one_line_per_epoch_and_no_progress_frames(tmp_path):
    """A log written to a file (not a terminal) gets the epoch lines only: no carriage-return frames."""
    result = subprocess.run(
        [sys.executable, "-m", "synthkd", "train-teacher", "--dataset", "digits:train[:256]", "--arch", "resnet8",
         "--width", "0.25", "--epochs", "2", "--batch-size", "16", "--out", str(tmp_path / "teacher")],
        capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "it/s" not in result.stderr
    assert [line.split(",")[0] for line in result.stderr.splitlines()] == ["teacher: epoch 1", "teacher: epoch 2"]
