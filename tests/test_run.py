"""`synthkd run CONFIG`: schema errors, overrides, which stages run / skip / resume / rerun, the
report files, and the quick config under a 2-process `accelerate launch`."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from synthkd.cli import main
from synthkd.pipelines.config import load_config
from synthkd.errors import SynthkdError
from synthkd.io import flatten
from synthkd.pipelines.run import plan, run_pipeline

from conftest import REPO, free_port, subprocess_env
from conftest import launcher


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def tiny_setting(teacher_dir: Path, out: Path, **distill) -> dict:
    """The tiny teacher given as a model directory, 32 inverted images, 2 KD epochs."""
    return {
        "out": str(out),
        "teacher": {"model": str(teacher_dir)},
        "student": {"arch": "resnet8", "width": 0.25},
        "generate": {"num_images": 32, "batch_size": 16, "iterations": 3, "flip": False},
        "distill": {"epochs": 2, "batch_size": 16, "flip": False, **distill},
        "eval_dataset": "digits:test[:90]",
        "report": {"samples_per_class": 2},
    }


def stage_files(run_dir: Path) -> dict[str, int]:
    return {p.stem: p.stat().st_mtime_ns for p in (run_dir / "stages").glob("*.json")}


def records(run_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (run_dir / "stages").glob("*.json")}


# ---------------------------------------------------------------------------------------------
# The schema


def test_every_problem_is_reported_at_once_with_its_path(tmp_path):
    config = write_config(tmp_path / "bad.yaml", {
        "teacher": {"dataset": "digits:train", "epochs": "ten", "widht": 1.0},
        "distill": {"mode": "nb", "lr": -1},
        "generat": {"num_images": 5},
        "student": {"arch": "resnet999"},
        "eval_dataset": f"cifar10:{tmp_path / 'nowhere'}:test",
    })
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(config), "generate.num_images=many", "seed"])
    assert result.exit_code == 2, result.output
    message = result.output
    for expected in (
        'teacher.epochs: expected an integer, got "ten"',
        "teacher.widht: unknown key; did you mean width?",
        'distill.mode: expected one of "e2e", "neighbourhood", got "nb"',
        "distill.lr: must be positive, got -1",
        "generat: unknown key; did you mean generate?",
        'generate.num_images: expected an integer, got "many"',
        "seed: an override is KEY=VALUE",
        "student.arch: 'resnet999' is neither a zoo architecture",
        "eval_dataset: CIFAR-10 python batches not found",
    ):
        assert expected in message, (expected, message)
    assert "9 problems" in message
    assert not Path("runs/bad").exists()  # nothing ran


def test_overrides_are_yaml_scalars_and_reach_any_key(tmp_path, teacher_dir):
    config = write_config(tmp_path / "c.yaml", tiny_setting(teacher_dir, tmp_path / "run"))
    loaded = load_config(config, ["distill.epochs=5", "distill.lr=null", "distill.flip=true", "generate.lr=0.5",
                                  "teacher.input_shape=[1, 8, 8]", "out=elsewhere"])
    assert loaded.distill.epochs == 5 and loaded.distill.lr is None and loaded.distill.learning_rate() == 0.05
    assert loaded.distill.flip is True and loaded.generate.lr == 0.5
    assert loaded.teacher.input_shape == [1, 8, 8] and loaded.out == "elsewhere"
    with pytest.raises(SynthkdError, match="distill.epochs: expected an integer, got 2.5"):
        load_config(config, ["distill.epochs=2.5"])
    with pytest.raises(SynthkdError, match="distill: is a value, not a section"):
        load_config(config, ["distill=3", "distill.epochs.x=1"])


def test_teacher_needs_a_model_or_a_dataset(tmp_path):
    config = write_config(tmp_path / "c.yaml", {"teacher": {"model": str(tmp_path / "missing")}})
    with pytest.raises(SynthkdError) as error:
        load_config(config)
    assert "teacher.model" in str(error.value) and "is not a model directory" in str(error.value)
    with pytest.raises(SynthkdError, match="teacher: give model"):
        load_config(write_config(tmp_path / "d.yaml", {"student": {"width": 0.5}}))


def write_fake_cifar(root: Path, per_batch: int = 4) -> Path:
    """CIFAR-10 python batches (5 training batches and the test batch) of a few random images."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), b"labels": list(range(per_batch))}
        (root / name).write_bytes(pickle.dumps(batch))
    return root


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_in_the_repository_loads_as_written(tmp_path, path):
    """Each config validates (data it names replaced by small files where absent), and every key
    it sets reaches the loaded config with the value written: no key is silently dropped."""
    raw = yaml.safe_load(path.read_text())
    overrides = []
    if "cifar10" in path.read_text():
        root = write_fake_cifar(tmp_path / "cifar-10-batches-py")
        overrides = [f"teacher.dataset=cifar10:{root}:train", f"eval_dataset=cifar10:{root}:test"]
    loaded = flatten(load_config(path, overrides).to_dict())
    written = flatten(raw)
    for key in (o.partition("=")[0] for o in overrides):
        written.pop(key, None)
    assert {k: loaded[k] for k in written} == written


def test_a_config_that_names_missing_data_is_refused_with_its_keys(tmp_path):
    cifar = REPO / "configs" / "cifar10_resnet34_resnet18.yaml"
    root = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    result = CliRunner().invoke(main, ["run", str(cifar), "--dry-run", f"out={tmp_path / 'run'}",
                                       f"teacher.dataset=cifar10:{root}:train", f"eval_dataset=cifar10:{root}:test"])
    assert result.exit_code == 0, result.output
    assert re.search(r"teacher\s+run\s+not run yet", result.output)
    # Without the data the config names its dataset keys, exit code 2.
    result = CliRunner().invoke(main, ["run", str(cifar), "--dry-run"])
    assert result.exit_code == 2 and "teacher.dataset: CIFAR-10 python batches not found" in result.output


# ---------------------------------------------------------------------------------------------
# Stages: skip, rerun, resume, failure


CRASHING_STUDENT = '''
import os
from torch import nn


class Net(nn.Module):
    """A small CNN that raises on its 3rd training batch while the file CRASH exists: a run
    interrupted in the middle of its second epoch."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == 3 and os.path.exists(os.environ["SYNTHKD_TEST_CRASH"]):
                raise RuntimeError("simulated crash in the middle of training")
        return self.body(x)


def factory():
    return Net()
'''


def test_stages_skip_rerun_and_resume(tmp_path, teacher_dir, accelerator, monkeypatch):
    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "tiny.yaml", tiny_setting(teacher_dir, run_dir))

    summary = run_pipeline(load_config(path), accelerator, quiet=True)
    first = records(run_dir)
    assert {name: r["status"] for name, r in first.items()} == dict.fromkeys(["teacher", "generate", "distill", "evaluate"], "done")
    assert [s.action for s in plan(load_config(path), run_dir)][-2:] == ["off", "off"]  # no detector asked for
    assert {name: r["action"] for name, r in first.items()} == dict.fromkeys(first, "run")
    assert 0 <= summary["student_accuracy"] <= 1 and summary["teacher_accuracy"] > 0.8
    assert summary["num_synthetic_images"] == 32

    # Unchanged: nothing runs, no record is rewritten.
    before = stage_files(run_dir)
    weights = (run_dir / "student" / "model.safetensors").stat().st_mtime_ns
    run_pipeline(load_config(path), accelerator, quiet=True)
    assert stage_files(run_dir) == before
    assert (run_dir / "student" / "model.safetensors").stat().st_mtime_ns == weights
    assert "skip" in (run_dir / "report.md").read_text()
    # A run directory from before the search and the other generation methods existed: their keys
    # are missing from its config.yaml, and at their defaults they are no difference.
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    del recorded["search"], recorded["generate"]["fast"], recorded["generate"]["diffusion"], recorded["generate"]["selection"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    run_pipeline(load_config(path), accelerator, quiet=True)
    assert stage_files(run_dir) == before

    # Another config in the same directory is refused, naming the difference...
    with pytest.raises(SynthkdError, match=r"distill.epochs: 2 -> 3"):
        run_pipeline(load_config(path, ["distill.epochs=3"]), accelerator, quiet=True)
    assert stage_files(run_dir) == before
    # ... and with force only the changed stage and those after it rerun.
    steps = {s.stage.name: s.action for s in plan(load_config(path, ["distill.epochs=3"]), run_dir)}
    assert steps == {"teacher": "skip", "generate": "skip", "distill": "rerun", "evaluate": "rerun",
                     "calibrate": "off", "evaluate_detector": "off"}
    run_pipeline(load_config(path, ["distill.epochs=3"]), accelerator, force=True, quiet=True)
    after = stage_files(run_dir)
    assert [after[n] == before[n] for n in ("teacher", "generate", "distill", "evaluate")] == [True, True, False, False]
    history = json.loads((run_dir / "student" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]

    # A generation setting changes everything from generate on.
    steps = {s.stage.name: s.action for s in plan(load_config(path, ["distill.epochs=3", "generate.iterations=4"]), run_dir)}
    assert steps == {"teacher": "skip", "generate": "rerun", "distill": "rerun", "evaluate": "rerun",
                     "calibrate": "off", "evaluate_detector": "off"}


def test_a_failed_stage_keeps_earlier_artefacts_and_resumes(tmp_path, teacher_dir, accelerator, monkeypatch):
    student_file = tmp_path / "crashing_student.py"
    student_file.write_text(CRASHING_STUDENT)
    crash = tmp_path / "CRASH"
    crash.touch()
    monkeypatch.setenv("SYNTHKD_TEST_CRASH", str(crash))
    run_dir = tmp_path / "run"
    setting = tiny_setting(teacher_dir, run_dir)
    setting["student"] = {"arch": f"{student_file}:factory"}
    path = write_config(tmp_path / "tiny.yaml", setting)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(load_config(path), accelerator, quiet=True)
    state = records(run_dir)
    assert state["generate"]["status"] == "done" and state["distill"]["status"] == "failed"
    assert "simulated crash" in state["distill"]["error"] and "evaluate" not in state
    synthetic = sorted((p.name, p.stat().st_mtime_ns) for p in (run_dir / "synthetic").glob("shard-*"))
    assert (run_dir / "student" / "training_state.pt").is_file()  # epoch 1 was checkpointed
    assert "simulated crash" in (run_dir / "run.log").read_text()

    crash.unlink()
    assert {s.stage.name: s.action for s in plan(load_config(path), run_dir)}["distill"] == "resume"
    run_pipeline(load_config(path), accelerator, quiet=True)
    state = records(run_dir)
    assert state["distill"]["status"] == "done" and state["distill"]["action"] == "resume"
    assert "resuming after epoch 1" in (run_dir / "run.log").read_text()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (run_dir / "synthetic").glob("shard-*")) == synthetic
    assert state["evaluate"]["status"] == "done"


def test_report_references_only_files_that_exist(tmp_path, teacher_dir, accelerator):
    run_dir = tmp_path / "run"
    setting = tiny_setting(teacher_dir, run_dir, mode="neighbourhood", finetune_epochs=1)
    setting["student"] = {"arch": "resnet8"}  # the neighbourhood default: the teacher's width, thinner inside each block
    setting["detector"] = {"enabled": True, "density": "gmm-diag", "components": 2, "ood": ["noise:gaussian"], "limit": 60}
    path = write_config(tmp_path / "tiny.yaml", setting)
    run_pipeline(load_config(path), accelerator, quiet=True)
    page = (run_dir / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert {"report/samples.png", "report/curves.png", "report/neighbourhoods.png", "report/per_class.png",
            "detector-evaluation/roc-misclassification.png", "detector-evaluation/roc-noise-gaussian.png",
            "detector-evaluation/hist-detector.png"} <= set(sources)
    for source in sources:
        assert not Path(source).is_absolute() and (run_dir / source).is_file()
        assert (run_dir / source).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (run_dir / "report.md").read_text()
    assert set(re.findall(r"\]\(([^)]+\.png)\)", markdown)) == set(sources)
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("teacher_accuracy", "student_accuracy", "gap_points", "merged_accuracy_before_finetune",
                "neighbourhood_relative_mse", "per_class", "stages", "compression"):
        assert key in summary, key
    assert set(summary["detector_auroc"]) == {"misclassification", "noise:gaussian"}
    assert "## Synthetic set diagnostic" in markdown and isinstance(summary["synthetic_collapsed_classes"], list)
    assert set(summary["stages"]) == {"teacher", "generate", "distill", "evaluate", "calibrate", "evaluate_detector"}
    assert all(v["seconds"] > 0 for v in summary["stages"].values())
    # finished detector stages are skipped next time; the BatchNorm term reruns calibration and what follows
    assert {s.stage.name: s.action for s in plan(load_config(path), run_dir)} == dict.fromkeys(summary["stages"], "skip")
    steps = {s.stage.name: s.action for s in plan(load_config(path, ["detector.batchnorm_weight=2"]), run_dir)}
    assert [steps["distill"], steps["calibrate"], steps["evaluate_detector"]] == ["skip", "rerun", "rerun"]
    steps = {s.stage.name: s.action for s in plan(load_config(path, ["detector.smoothing=0.1"]), run_dir)}
    assert [steps["distill"], steps["calibrate"], steps["evaluate_detector"]] == ["skip", "rerun", "rerun"]


# ---------------------------------------------------------------------------------------------
# The quick config under accelerate launch


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks on one GPU: NCCL refuses a shared device")
def test_quick_config_with_two_processes(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        *launcher(), "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "synthkd", "run", "configs/digits_quick.yaml", f"out={run_dir}", "teacher.epochs=4",
        "generate.num_images=64", "generate.batch_size=32", "generate.iterations=5", "distill.epochs=2",
        "detector.limit=100",
        "--tracker", "tensorboard",
    ]
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("synthkd run ->") == 1, done.stderr  # only the main process reports
    state = records(run_dir)
    assert len(state) == 6 and all(r["status"] == "done" and r["num_processes"] == 2 for r in state.values()), state
    manifest = json.loads((run_dir / "synthetic" / "manifest.json").read_text())
    assert sorted({s["rank"] for s in manifest["shards"]}) == [0, 1]
    assert (run_dir / "report.html").is_file() and (run_dir / "summary.json").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "trackers" / "synthkd-run"))
    events.Reload()
    assert {"teacher/loss", "distill/loss", "distill/eval_accuracy"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("distill/loss")) == 2
    assert (run_dir / "run.log").read_text().count("[distill] done") == 1


# ---------------------------------------------------------------------------------------------
# The other generation methods and Student Search as stages


def test_fast_method_from_the_quick_config(tmp_path, teacher_dir, accelerator):
    run_dir = tmp_path / "run"
    overrides = [f"out={run_dir}", f"teacher.model={teacher_dir}", "generate.method=fast", "generate.num_images=32",
                 "generate.batch_size=16", "generate.fast.steps_per_batch=2", "generate.fast.warmup_batches=1",
                 "distill.epochs=1", "distill.batch_size=16", "detector.enabled=false", "eval_dataset=digits:test[:90]"]
    config_file = REPO / "configs" / "digits_quick.yaml"
    summary = run_pipeline(load_config(config_file, overrides), accelerator, quiet=True)
    state = records(run_dir)
    assert all(r["status"] == "done" for r in state.values()) and state["generate"]["results"]["method"] == "fast"
    assert state["generate"]["config"]["fast"]["steps_per_batch"] == 2
    assert "diffusion" not in state["generate"]["config"] and "iterations" not in state["generate"]["config"]
    manifest = json.loads((run_dir / "synthetic" / "manifest.json").read_text())
    assert manifest["method"] == "fast" and manifest["num_images"] == 32
    assert (run_dir / "synthetic" / "generator-state.safetensors").is_file()
    assert summary["generate_method"] == "fast" and (run_dir / "report" / "samples.png").is_file()
    # Another method's settings do not touch the set; the method's own do, and everything after it.
    steps = {s.stage.name: s.action for s in plan(load_config(config_file, overrides + ["generate.diffusion.steps=3",
                                                                                        "generate.iterations=7"]), run_dir)}
    assert (steps["generate"], steps["distill"]) == ("skip", "skip")
    steps = {s.stage.name: (s.action, s.reason) for s in plan(load_config(config_file, overrides + ["generate.fast.latent_dim=64"]), run_dir)}
    assert steps["generate"] == ("rerun", "fast.latent_dim: 128 -> 64") and steps["evaluate"][0] == "rerun"
    assert steps["teacher"][0] == "skip"


def test_diffusion_method_with_a_saved_ddpm_pipeline(tmp_path, teacher_dir, accelerator):
    from test_diffusion import save_ddpm

    pipeline = save_ddpm(tmp_path / "ddpm")
    run_dir = tmp_path / "run"
    setting = tiny_setting(teacher_dir, run_dir)
    setting["generate"] = {"method": "diffusion", "num_images": 32, "batch_size": 16,
                           "diffusion": {"pipeline": str(pipeline), "steps": 2, "scheduler": "ddim"},
                           "selection": {"min_confidence": 0.2, "max_tries": 2}}
    path = write_config(tmp_path / "tiny.yaml", setting)
    summary = run_pipeline(load_config(path), accelerator, quiet=True)
    state = records(run_dir)
    assert all(r["status"] == "done" for r in state.values())
    generate = state["generate"]
    assert generate["results"]["method"] == "diffusion" and generate["config"]["diffusion"]["steps"] == 2
    assert sum(generate["results"]["selection"]["drawn"]) >= 32  # the teacher's selection was applied
    manifest = json.loads((run_dir / "synthetic" / "manifest.json").read_text())
    assert manifest["method"] == "diffusion" and manifest["config"]["scheduler"] == "ddim"
    assert manifest["config"]["selection"]["min_confidence"] == 0.2
    assert summary["generate_method"] == "diffusion" and 0 <= summary["student_accuracy"] <= 1
    assert "report/samples.png" in (run_dir / "report.html").read_text()
    # Back to inversion: the set and everything after it are made again.
    steps = {s.stage.name: (s.action, s.reason) for s in plan(load_config(path, ["generate.method=inversion"]), run_dir)}
    assert steps["generate"][0] == "rerun" and 'method: "diffusion" -> "inversion"' in steps["generate"][1]
    assert steps["distill"][0] == steps["evaluate"][0] == "rerun" and steps["teacher"][0] == "skip"
    # The pipeline retrained at the same path: generation and what follows rerun.
    assert {s.stage.name: s.action for s in plan(load_config(path), run_dir)}["generate"] == "skip"
    save_ddpm(pipeline, sample_size=16)
    steps = {s.stage.name: (s.action, s.reason) for s in plan(load_config(path), run_dir)}
    assert steps["generate"] == ("rerun", f"{pipeline} changed") and steps["distill"][0] == "rerun"


def test_search_replaces_distillation(tmp_path, teacher_dir, accelerator):
    run_dir = tmp_path / "run"
    setting = tiny_setting(teacher_dir, run_dir)
    setting["search"] = {"enabled": True, "budget": "params=0.6", "candidates": "width=0.5,1.0", "epochs": 1,
                         "sparsity_epochs": 1, "batch_size": 16}
    path = write_config(tmp_path / "tiny.yaml", setting)
    summary = run_pipeline(load_config(path), accelerator, quiet=True)
    state = records(run_dir)
    distill = state["distill"]
    assert all(r["status"] == "done" for r in state.values()) and distill["results"]["mode"] == "search"
    assert "search" in distill["config"] and "distill" not in distill["config"]
    report = json.loads((run_dir / "student" / "report.json").read_text())
    assert report["chosen_costs"]["params"] <= report["limit"] and report["trained"] > 0
    assert (run_dir / "search-cache").is_dir()
    assert summary["distill_mode"] == "search"
    assert summary["search"]["chosen"] == [row["candidate"] for row in report["chosen"]]
    page = (run_dir / "report.html").read_text()
    assert "Student Search" in page and '<img src="student/frontier.png"' in page
    assert (run_dir / "student" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (run_dir / "report.md").read_text()
    for row in report["chosen"]:  # the chosen candidate of every neighbourhood
        assert f"| {row['neighbourhood']} | {row['candidate']} | {row['relative_mse']:.4f} |" in markdown
    # Distillation settings are not the student's while the search is on; turning it off reruns it.
    assert {s.stage.name: s.action for s in plan(load_config(path, ["distill.epochs=9"]), run_dir)}["distill"] == "skip"
    steps = {s.stage.name: s.action for s in plan(load_config(path, ["search.enabled=false"]), run_dir)}
    assert (steps["generate"], steps["distill"], steps["evaluate"]) == ("skip", "rerun", "rerun")


def test_schema_errors_of_the_new_keys(tmp_path, teacher_dir):
    path = write_config(tmp_path / "c.yaml", tiny_setting(teacher_dir, tmp_path / "run"))
    with pytest.raises(SynthkdError) as error:
        load_config(path, ["generate.method=diffusion", "generate.diffusion.steps=0", "generate.diffusion.class_table={",
                           "generate.selection.min_confidence=2", "generate.fast.latnt_dim=3", "generate.fast.meta_lr=2",
                           "search.enabled=true", "search.budget=memory=0.3", 'search.epochs="x"', "generate.method2=fast",
                           "detector.enabled=true", "detector.batchnorm_weight=-1"])
    message = str(error.value)
    for expected in (
        "generate.diffusion.pipeline: is needed by the diffusion method",
        "generate.diffusion.steps: must be positive, got 0",
        "generate.diffusion.class_table: '{' is neither a readable JSON file nor a JSON object",
        "generate.selection.min_confidence: must be in [0, 1], got 2",
        "generate.fast.latnt_dim: unknown key; did you mean latent_dim?",
        "search.budget: unknown budget kind 'memory'",
        'search.epochs: expected an integer, got "x"',
        "generate.method2: unknown key",
        "detector.batchnorm_weight: expected 0 (off) or a positive weight, got -1",
    ):
        assert expected in message, (expected, message)
    with pytest.raises(SynthkdError) as error:
        load_config(path, ["generate.method=fast", "generate.fast.meta_lr=2", "generate.fast.bn_momentum=1"])
    assert "generate.fast.meta_lr: must be in (0, 1]" in str(error.value)
    with pytest.raises(SynthkdError, match="detector.smoothing: expected 0"):
        load_config(path, ["detector.enabled=true", "detector.smoothing=-1"])
    assert "generate.fast.bn_momentum: must be in [0, 1)" in str(error.value)
    with pytest.raises(SynthkdError, match=f"generate.diffusion.pipeline: no pipeline directory {tmp_path}/nowhere"):
        load_config(path, ["generate.method=diffusion", f"generate.diffusion.pipeline={tmp_path}/nowhere"])
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run", "generate.method=diffusion"])
    assert result.exit_code == 2 and "generate.diffusion.pipeline" in result.output
