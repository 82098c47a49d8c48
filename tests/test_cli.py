"""The `synthkd` command line, run in-process with click's CliRunner: the whole path on a tiny
digits setting, then one test per mistake a user can make (exit code 2, one-line error)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from synthkd.cli import main
from synthkd.data import load_dataset
from synthkd.data.format import shard_name
from synthkd.data.reader import SyntheticDataset
from synthkd.io import LOCK_NAME
from synthkd.models import Classifier, InputFormat, ModelConfig

from conftest import REPO, subprocess_env


def invoke(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def ok(*args: str):
    result = invoke(*args)
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def error_line(result) -> str:
    """The single-line error of a failed command (exit code 2), with no traceback."""
    assert result.exit_code == 2, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def files_state(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    """Content, inode and mtime of every file under ``directory`` (but the writers' lock file):
    any rewrite changes it."""
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*")) if p.is_file() and p.name != LOCK_NAME
    }


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """train-teacher -> generate -> distill -> evaluate, run once for the module."""
    root = tmp_path_factory.mktemp("cli")
    teacher, data, student = root / "teacher", root / "synthetic", root / "student"
    runs = {
        "train": ok("train-teacher", "--dataset", "digits:train", "--arch", "resnet8", "--width", "0.25",
                    "--epochs", "1", "--batch-size", "64", "--no-flip", "--eval-dataset", "digits:test[:100]",
                    "--out", teacher),
        "generate": ok("generate", "--teacher", teacher, "--num-images", "40", "--batch-size", "16",
                       "--iterations", "5", "--out", data),
        "distill": ok("distill", "--teacher", teacher, "--student", "resnet8", "--student-width", "0.25",
                      "--data", data, "--epochs", "1", "--batch-size", "16", "--eval-dataset", "digits:test",
                      "--out", student),
        "evaluate": ok("evaluate", "--model", student, "--dataset", "digits:test", "--json"),
    }
    return {"root": root, "teacher": teacher, "data": data, "student": student, "runs": runs}


def test_train_teacher(flow):
    teacher = flow["teacher"]
    assert sorted(p.name for p in teacher.iterdir()) == [".synthkd.lock", "config.json", "metrics.json", "model.safetensors", "training.json"]
    config = json.loads((teacher / "config.json").read_text())
    assert config["arch"] == "resnet8"
    assert config["arch_kwargs"] == {"width": 0.25, "in_channels": 1, "num_classes": 10}
    assert config["input_shape"] == [1, 8, 8]
    assert config["class_names"] == [str(i) for i in range(10)]
    mean, std = load_dataset("digits:train").channel_stats()
    assert config["mean"] == pytest.approx(mean) and config["std"] == pytest.approx(std)
    metrics = json.loads((teacher / "metrics.json").read_text())
    assert len(metrics["history"]) == 1 and metrics["eval"]["num_images"] == 100
    accuracy = metrics["eval"]["accuracy"]
    assert f"teacher accuracy on digits:test[:100]: {accuracy:.4f}" in flow["runs"]["train"].stdout
    assert accuracy > 0.2  # one epoch of a tiny net: far from perfect, above chance


def test_generate(flow):
    data, teacher = flow["data"], Classifier.from_pretrained(flow["teacher"]).eval()
    assert f"wrote 40 images in 3 shards to {data}" in flow["runs"]["generate"].stdout
    manifest = json.loads((data / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [16, 16, 8]
    assert manifest["counts_per_class"] == [4] * 10
    assert manifest["config"]["iterations"] == 5 and manifest["config"]["seed"] == 0
    assert manifest["teacher"]["fingerprint"] == teacher.fingerprint()
    assert manifest["image_shape"] == [1, 8, 8]
    synthetic = SyntheticDataset(data)
    assert len(synthetic) == 40
    assert synthetic.targets.tolist() == [i % 10 for i in range(40)]
    with torch.no_grad():
        assert torch.allclose(synthetic.logits, teacher(synthetic.images), atol=1e-4)


def test_generate_again_is_a_no_op(flow, tmp_path):
    data = tmp_path / "synthetic"
    shutil.copytree(flow["data"], data)
    before = files_state(data)
    result = ok("generate", "--teacher", flow["teacher"], "--num-images", "40", "--batch-size", "16",
                "--iterations", "5", "--out", data)
    assert "wrote 40 images in 3 shards" in result.stdout
    assert files_state(data) == before


def test_distill(flow):
    student = flow["student"]
    last = flow["runs"]["distill"].stdout.strip().splitlines()[-1]
    assert last.startswith("teacher ") and "student " in last and last.endswith("points on digits:test")
    config = json.loads((student / "config.json").read_text())
    teacher_config = json.loads((flow["teacher"] / "config.json").read_text())
    assert config["arch"] == "resnet8" and config["arch_kwargs"]["width"] == 0.25
    for key in ("input_shape", "mean", "std", "class_names"):
        assert config[key] == teacher_config[key]
    metrics = json.loads((student / "metrics.json").read_text())
    assert metrics["num_training_images"] == 40 and len(metrics["history"]) == 1
    assert metrics["train"]["epochs"] == 1 and metrics["train"]["batch_size"] == 16
    assert metrics["gap"] == pytest.approx(metrics["teacher"]["accuracy"] - metrics["student"]["accuracy"])
    assert f"student {metrics['student']['accuracy']:.4f}" in last


def test_distill_is_reproducible_from_its_seed(flow, tmp_path):
    def run(name, seed):
        ok("distill", "--teacher", flow["teacher"], "--student", "resnet8", "--student-width", "0.25",
           "--data", flow["data"], "--epochs", "1", "--batch-size", "16", "--seed", seed, "--out", tmp_path / name)
        return (tmp_path / name / "model.safetensors").read_bytes()

    first = run("a", "3")
    assert run("b", "3") == first
    assert run("c", "4") != first


def test_distill_on_a_real_dataset_spec(flow, tmp_path):
    ok("distill", "--teacher", flow["teacher"], "--student", "resnet8", "--student-width", "0.25",
       "--data", "digits:train[:48]", "--epochs", "1", "--batch-size", "16", "--out", tmp_path / "student")
    metrics = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert metrics["num_training_images"] == 48 and metrics["data"] == "digits:train[:48]"
    assert "student" not in metrics  # no --eval-dataset
    assert Classifier.from_pretrained(tmp_path / "student").num_classes == 10


def test_evaluate_json(flow):
    report = json.loads(flow["runs"]["evaluate"].stdout)
    assert report["dataset"] == "digits:test"
    assert "accuracy" in report and 0.0 <= report["accuracy"] <= 1.0
    assert report["num_images"] == 445
    assert sorted(report["per_class"]) == [str(i) for i in range(10)]
    metrics = json.loads((flow["student"] / "metrics.json").read_text())
    assert report["accuracy"] == pytest.approx(metrics["student"]["accuracy"], abs=1e-6)
    # the text report says the same
    text = ok("evaluate", "--model", flow["student"], "--dataset", "digits:test").stdout
    assert text.splitlines()[0] == f"accuracy {report['accuracy']:.4f} on 445 images of digits:test"


def test_models_command():
    from synthkd.models import MODELS, SOURCES, create_model, is_registered

    lines = ok("models").stdout.split()
    names, sources = lines[:len(MODELS.names())], lines[len(MODELS.names()):]
    assert names == MODELS.names() and "resnet8" in names
    assert sources == [SOURCES.get(name).usage for name in SOURCES.names()] and sources[0].startswith("torchvision:NAME")
    for name in names:  # every listed architecture is registered and builds
        assert is_registered(name)
        assert create_model(name, width=0.25, in_channels=1, num_classes=3)(torch.zeros(2, 1, 8, 8)).shape == (2, 3)


def test_stage_commands_default_to_the_run_schema():
    """One source per setting: each option of train-teacher, distill and search defaults to the
    value the same key has in a `synthkd run` config that leaves it out."""
    from synthkd.cli.options import cli_fields
    from synthkd.pipelines.config import RunConfig
    from synthkd.pipelines.distill import DistillSettings, StudentSettings
    from synthkd.pipelines.search import SearchSettings
    from synthkd.pipelines.train_teacher import TeacherSettings

    config = RunConfig()
    compared = 0
    for command, settings, section in (("train-teacher", TeacherSettings, config.teacher), ("distill", DistillSettings, config.distill),
                                       ("distill", StudentSettings, config.student), ("search", SearchSettings, config.search)):
        options = {param.name: param.default for param in main.commands[command].params}
        for spec in cli_fields(settings):
            assert options[spec.name] == getattr(section, spec.name), (command, spec.name)
            compared += 1
    assert compared >= 25


def test_generate_with_a_model_given_as_code(tmp_path):
    source = tmp_path / "net.py"
    source.write_text(textwrap.dedent(
        """
        from torch import nn

        def small():
            return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        """
    ))
    torch.manual_seed(0)
    namespace: dict = {}
    exec(source.read_text(), namespace)
    torch.save(namespace["small"]().state_dict(), tmp_path / "w.pt")
    out = tmp_path / "set"
    ok("generate", "--teacher", f"{source}:small", "--teacher-weights", tmp_path / "w.pt", "--input-shape", "1,12,12",
       "--mean", "0.5", "--std", "0.25", "--num-images", "6", "--batch-size", "4", "--iterations", "2", "--out", out)
    data = SyntheticDataset(out)
    assert data.images.shape == (6, 1, 12, 12) and data.num_classes == 3
    assert data.manifest["counts_per_class"] == [2, 2, 2]


# ------------------------------------------------------------------------------ mistakes
def test_unknown_arch(tmp_path):
    result = invoke("train-teacher", "--dataset", "digits:train[:20]", "--arch", "resnet9", "--epochs", "1",
                    "--out", tmp_path / "t")
    line = error_line(result)
    assert "resnet9" in line and "resnet8" in line and "resnet56" in line
    assert not (tmp_path / "t").exists()


def test_teacher_that_is_not_a_model_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("generate", "--teacher", tmp_path / "empty", "--num-images", "4", "--out", tmp_path / "s")
    line = error_line(result)
    assert "is not a model directory" in line and str(tmp_path / "empty") in line
    assert not (tmp_path / "s").exists()
    result = invoke("evaluate", "--model", tmp_path / "nowhere", "--dataset", "digits:test")
    assert "needs its weights" in error_line(result)


def test_student_with_other_classes(flow, tmp_path):
    config = ModelConfig(
        arch="resnet8", arch_kwargs={"width": 0.25, "in_channels": 1, "num_classes": 3},
        input=InputFormat(1, 8, 8), class_names=["a", "b", "c"],
    )
    Classifier.from_config(config).save_pretrained(tmp_path / "three")
    result = invoke("distill", "--teacher", flow["teacher"], "--student", tmp_path / "three", "--data", flow["data"],
                    "--epochs", "1", "--out", tmp_path / "student")
    line = error_line(result)
    assert "predicts 3 classes but the teacher predicts 10" in line
    assert not (tmp_path / "student").exists()


def test_distill_on_a_corrupt_shard(flow, tmp_path):
    data = tmp_path / "synthetic"
    shutil.copytree(flow["data"], data)
    shard = data / shard_name(1)
    raw = bytearray(shard.read_bytes())
    for offset in (-3, -40, -200):
        raw[offset] ^= 0xFF
    shard.write_bytes(bytes(raw))
    result = invoke("distill", "--teacher", flow["teacher"], "--student", "resnet8", "--data", data,
                    "--epochs", "1", "--out", tmp_path / "student")
    line = error_line(result)
    assert shard_name(1) in line and "corrupt" in line and "synthkd generate" in line
    assert shard_name(0) not in line
    assert not (tmp_path / "student").exists()


def test_distill_on_something_that_is_not_a_set(flow, tmp_path):
    result = invoke("distill", "--teacher", flow["teacher"], "--data", flow["teacher"], "--epochs", "1",
                    "--out", tmp_path / "student")
    assert "not a synthetic set" in error_line(result)


def test_generate_resumed_with_other_settings(flow, tmp_path):
    data = tmp_path / "synthetic"
    shutil.copytree(flow["data"], data)
    before = files_state(data)
    result = invoke("generate", "--teacher", flow["teacher"], "--num-images", "40", "--batch-size", "16",
                    "--iterations", "6", "--out", data)
    line = error_line(result)
    assert "existing run -> now: config.iterations: 5 -> 6" in line and "--out" in line
    assert files_state(data) == before  # manifest.json, run.json and shards: nothing rewritten

    # An unfinished set is protected the same way.
    (data / "manifest.json").unlink()
    run_before = (data / "run.json").read_bytes()
    result = invoke("generate", "--teacher", flow["teacher"], "--num-images", "48", "--batch-size", "16",
                    "--iterations", "5", "--out", data)
    assert "num_images: 40 -> 48" in error_line(result)
    assert (data / "run.json").read_bytes() == run_before
    assert not (data / "manifest.json").exists()


def test_missing_dataset_path(tmp_path):
    result = invoke("train-teacher", "--dataset", f"fashion-mnist:{tmp_path / 'none'}:train", "--epochs", "1",
                    "--out", tmp_path / "t")
    line = error_line(result)
    assert "apt-get install dataset-fashion-mnist" in line and str(tmp_path / "none") in line
    result = invoke("evaluate", "--model", tmp_path / "none", "--dataset", "digits:test")
    assert result.exit_code == 2
    result = invoke("train-teacher", "--dataset", f"folder:{tmp_path / 'nope'}", "--epochs", "1",
                    "--out", tmp_path / "t")
    assert "does not exist" in error_line(result)


def test_bad_numbers(flow, tmp_path):
    result = invoke("generate", "--teacher", flow["teacher"], "--num-images", "0", "--out", tmp_path / "s")
    assert "must be positive" in error_line(result)
    result = invoke("evaluate", "--model", "x.py:f", "--weights", "w.pt", "--input-shape", "1,8",
                    "--dataset", "digits:test")
    assert result.exit_code == 2 and "C,H,W" in result.output  # click's own usage error


def test_python_dash_m_help():
    done = subprocess.run(
        [sys.executable, "-m", "synthkd", "--help"], cwd=REPO, env=subprocess_env(),
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: synthkd")
    for command in ("train-teacher", "generate", "distill", "evaluate", "models", "demo"):
        assert command in done.stdout
