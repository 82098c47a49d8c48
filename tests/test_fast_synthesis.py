"""Fast synthesis on the tiny digits teacher: the meta-learned generator, its saved state, the
interleaved distillation (killed and resumed), per-neighbourhood activations, and the errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from synthkd.cli import main
from synthkd.data.activations import ActivationDataset
from synthkd.data.format import shard_name
from synthkd.data.reader import SyntheticDataset
from synthkd.errors import SynthkdError
from synthkd.generators.activations import ActivationSettings, ActivationSynthesizer
from synthkd.generators.fast import STATE_NAME, FastGenerator, FastSettings
from synthkd.generators.inversion import InversionLossSettings
from synthkd.losses import BatchNormStatisticsLoss
from synthkd.models import Classifier
from synthkd.neighbourhood_training import NeighbourhoodSettings
from synthkd.pipelines.activations import generate_activations
from synthkd.pipelines.distill import build_student, distill_neighbourhood
from synthkd.pipelines.generate import generate
from synthkd.training import TrainSettings

from conftest import REPO, run_killed_after_shards, subprocess_env
from test_cli import error_line, invoke
from conftest import launcher

# 8x8 digits: no sub-pixel jitter/crop and no flips (they change a digit's class).
NO_VIEWS = InversionLossSettings(flip=False, jitter=0.0, crop_scale=1.0)


def first_step_below(losses: list[float], level: float) -> int | None:
    """Number of steps after which the loss first is at or below ``level``."""
    return next((step + 1 for step, loss in enumerate(losses) if loss <= level), None)


def test_meta_initialisation_reduces_the_steps_a_new_batch_needs(teacher):
    # Momentum off, so both generators are judged against the same statistics.
    config = FastSettings(steps_per_batch=5, warmup_batches=0, bn_momentum=0.0, draws_per_adaptation=1)
    targets = torch.arange(32) % 10
    meta = FastGenerator(teacher, config, NO_VIEWS, seed=0)
    for batch in range(15):
        meta.generate(targets, seed=100 + batch)
    assert meta.batches == 15
    fresh = FastGenerator(teacher, config, NO_VIEWS, seed=0)  # the same random start the meta weights had
    meta.make_batch(targets, seed=999, steps=40, meta_step=False)
    fresh.make_batch(targets, seed=999, steps=40, meta_step=False)
    level = meta.losses[4]  # where the meta-learned start is after its 5 steps
    steps = first_step_below(fresh.losses, level)
    assert fresh.losses[0] > 3 * meta.losses[0]
    assert steps is None or steps >= 10, (meta.losses, fresh.losses)  # at least twice the steps
    # Learning changed only the meta weights, not the probe: a probe makes no meta step.
    assert fresh.batches == 0 and meta.batches == 15


def test_redraws_reuse_one_adaptation_for_several_batches(teacher):
    config = FastSettings(steps_per_batch=10, warmup_batches=4, draws_per_adaptation=3, latent_noise=0.25)
    generator = FastGenerator(teacher, config, NO_VIEWS, seed=0)
    targets = torch.arange(40) % 10
    batches = [generator.generate(targets, seed=seed) for seed in range(4)]
    assert generator.batches == 4 + 2  # warm-up, then calls 1 and 4 adapt (one meta step each); 2 and 3 redraw
    with torch.no_grad():
        agreement = [float((teacher(images).argmax(1) == targets).float().mean()) for images in batches[:3]]
    # A redraw is a new batch, aimed at the targets nearly as well as the adapted one ...
    assert not torch.allclose(batches[1], batches[0]) and not torch.allclose(batches[2], batches[1])
    assert agreement[0] > 0.5 and min(agreement[1:]) > agreement[0] - 0.2, agreement
    # ... and a fixed function of its seed.
    again = FastGenerator(teacher, config, NO_VIEWS, seed=0)
    again.generate(targets, seed=0)
    assert torch.equal(again.generate(targets, seed=1), batches[1])
    # Far noise leaves the fitted latents: the targets are lost.
    generator.settings.latent_noise = 20.0
    with torch.no_grad():
        far = float((teacher(generator.redraw(targets, seed=9)).argmax(1) == targets).float().mean())
    assert far < min(agreement[1:]) - 0.1, (far, agreement)


def test_fast_generation_saves_and_resumes_its_state(teacher, tmp_path, accelerator):
    config = FastSettings(steps_per_batch=2, warmup_batches=2, draws_per_adaptation=2)
    generator = FastGenerator(teacher, config, NO_VIEWS, seed=3)
    manifest = generate(teacher, generator, 40, tmp_path / "set", batch_size=16, seed=3, accelerator=accelerator)
    assert manifest["method"] == "fast" and manifest["config"]["steps_per_batch"] == 2
    data = SyntheticDataset(tmp_path / "set")
    assert data.images.shape == (40, 1, 8, 8) and 0 <= float(data.images.min()) and float(data.images.max()) <= 1
    assert generator.batches == 2 + 2  # warm-up, then shards 0 and 2 adapt (shard 1 is a redraw)
    state = load_file(str(tmp_path / "set" / STATE_NAME))
    assert torch.equal(state["meta.project.weight"], generator.meta.project.weight.detach())
    assert all(f"bn_history.{i}" in state for i in range(len(generator.objective.history)))

    resumed = FastGenerator(teacher, config, NO_VIEWS, seed=3)
    resumed.load_state(tmp_path / "set")
    assert resumed.batches == 4
    for a, b in zip(resumed.meta.state_dict().values(), generator.meta.state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(resumed.objective.history, generator.objective.history))
    # A resumed generator skips the warm-up and adapts first: one more batch is one more meta step.
    resumed.generate(torch.arange(4), seed=11)
    assert resumed.batches == 5

    with pytest.raises(SynthkdError, match="other settings"):
        FastGenerator(teacher, FastSettings(steps_per_batch=3, warmup_batches=2, draws_per_adaptation=2), NO_VIEWS,
                      seed=3).load_state(tmp_path / "set")
    (tmp_path / "set" / STATE_NAME).write_bytes(b"not safetensors")
    with pytest.raises(SynthkdError, match="unreadable"):
        FastGenerator(teacher, config, NO_VIEWS, seed=3).load_state(tmp_path / "set")


def test_bad_fast_settings_are_refused(teacher):
    with pytest.raises(SynthkdError, match=r"meta_lr must be in \(0, 1\]"):
        FastGenerator(teacher, FastSettings(meta_lr=1.5))
    with pytest.raises(SynthkdError, match="steps_per_batch must be at least 1"):
        FastGenerator(teacher, FastSettings(steps_per_batch=0))
    with pytest.raises(SynthkdError, match="draws_per_adaptation must be at least 1"):
        FastGenerator(teacher, FastSettings(draws_per_adaptation=0))
    with pytest.raises(SynthkdError, match="needs a student"):
        FastGenerator(teacher, FastSettings(), InversionLossSettings(competition_weight=1.0))


def bn_loss(module, inputs: torch.Tensor) -> float:
    statistics = BatchNormStatisticsLoss(module, first_layer_weight=1.0, distributed=False)
    try:
        with torch.no_grad():
            module(inputs.clone())
        return statistics.loss().item()
    finally:
        statistics.remove()


def test_activations_respect_the_batchnorm_statistics_they_were_fitted_to(teacher):
    synthesizer = ActivationSynthesizer(teacher, ActivationSettings(activation_lr=0.1), iterations=60)
    assert synthesizer.names[-1] == "head" and len(synthesizer.names) == len(synthesizer.cuts) + 1
    for k in (0, 2):
        inputs = synthesizer.synthesize(k, 64, seed=k)
        assert inputs.shape == (64, *synthesizer.input_shapes[k])
        piece = synthesizer.pieces[k]
        lower, upper = synthesizer.bounds[k]
        random = torch.randn(64, *synthesizer.input_shapes[k], generator=torch.Generator().manual_seed(k))
        random = synthesizer._clamp(random, lower, upper)
        assert bn_loss(piece, inputs) < 0.3 * bn_loss(piece, random), k
        # Per channel, the first BatchNorm's input has nearly its running mean and variance.
        layer = next(m for m in piece.modules() if isinstance(m, torch.nn.BatchNorm2d))
        seen = {}
        handle = layer.register_forward_pre_hook(lambda m, x: seen.setdefault("x", x[0].detach()))
        with torch.no_grad():
            piece(inputs.clone())
        handle.remove()
        mean, var = seen["x"].mean((0, 2, 3)), seen["x"].var((0, 2, 3), unbiased=False)
        scale = layer.running_var.sqrt().mean()
        assert (mean - layer.running_mean).abs().mean() < 0.3 * scale
        assert ((var - layer.running_var).abs() / layer.running_var).mean() < 0.5
    # Inputs after a ReLU are non-negative; the first neighbourhood's lie in the pixel range.
    after_relu = synthesizer.synthesize(1, 16, seed=5)
    assert synthesizer.bounds[1][0] is not None and float(after_relu.min()) >= 0
    fmt = teacher.input_format
    pixels = synthesizer.synthesize(0, 16, seed=6) * torch.tensor(fmt.std).view(-1, 1, 1) + torch.tensor(fmt.mean).view(-1, 1, 1)
    assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5
    # The head has no BatchNorm: its inputs are the teacher's previous neighbourhood's outputs.
    assert synthesizer.sources[-1] == len(synthesizer.names) - 2


def test_activation_set_resumes_and_trains_neighbourhoods_without_images(teacher, teacher_dir, tmp_path, accelerator):
    out = tmp_path / "activations"
    synthesizer = ActivationSynthesizer(teacher, iterations=10)
    manifest = generate_activations(teacher, synthesizer, 48, out, batch_size=32, seed=0, accelerator=accelerator)
    assert len(manifest["neighbourhoods"]) == len(manifest["names"])
    files = sorted(p.relative_to(out) for p in out.rglob("shard-*.safetensors"))
    assert len(files) == 2 * len(manifest["names"])  # shards of 32 and 16 per neighbourhood
    inodes = {f: (out / f).stat().st_ino for f in files}
    (out / files[3]).unlink()
    (out / "manifest.json").unlink()
    again = generate_activations(teacher, synthesizer, 48, out, batch_size=32, seed=0, accelerator=accelerator)
    assert again["neighbourhoods"] == manifest["neighbourhoods"]  # remade identically (per-shard seeds)
    assert all((out / f).stat().st_ino == inodes[f] for f in files if f != files[3])
    with pytest.raises(SynthkdError, match="other settings"):
        generate_activations(teacher, ActivationSynthesizer(teacher, iterations=11), 48, out, batch_size=32,
                             accelerator=accelerator)

    dataset = ActivationDataset(out)
    assert len(dataset) == 48 and len(dataset[0]) == len(manifest["names"])
    student = build_student("resnet8", teacher, 0.5, seed=0)
    config = NeighbourhoodSettings(epochs=2, batch_size=16, holdout=8)
    _, metrics = distill_neighbourhood(teacher, student, out, tmp_path / "student", config, None, "digits:test[:100]",
                                       accelerator, inputs="activations")
    assert metrics["inputs"] == "activations" and set(metrics["neighbourhoods"]) == set(manifest["names"])
    assert all(record["relative_mse"] < 1.0 for record in metrics["neighbourhoods"].values()), metrics["neighbourhoods"]
    assert (tmp_path / "student" / "model.safetensors").is_file()

    with pytest.raises(SynthkdError, match="needs images"):
        distill_neighbourhood(teacher, build_student("resnet8", teacher, 0.5), out, tmp_path / "s2", config,
                              TrainSettings(epochs=1), accelerator=accelerator, inputs="activations")
    with pytest.raises(SynthkdError, match="cuts"):
        distill_neighbourhood(teacher, build_student("resnet8", teacher, 0.5), out, tmp_path / "s3",
                              NeighbourhoodSettings(cuts="stages", epochs=1), accelerator=accelerator, inputs="activations")


def interleaved_command(teacher_dir, data, out, epochs: int) -> list[str]:
    return [
        sys.executable, "-m", "synthkd", "distill", "--teacher", str(teacher_dir), "--student", "resnet8",
        "--data", str(data), "--synthesize", "fast", "--num-images", "96", "--gen-batch-size", "16",
        "--batches-per-round", "2", "--steps-per-batch", "2", "--warmup-batches", "1", "--epochs", str(epochs),
        "--batch-size", "16", "--no-flip", "--out", str(out),
    ]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_interleaved_distillation_resumes_after_sigkill(teacher_dir, tmp_path):
    data, out = tmp_path / "data", tmp_path / "student"
    command = interleaved_command(teacher_dir, data, out, epochs=6)
    run_killed_after_shards(command, 4, 180)  # the 2nd round's shards: after epoch 1 and its training_state.pt
    before = {p.name: p.stat().st_ino for p in data.glob("shard-*.safetensors")}
    assert 2 <= len(before) < 6 and not (data / "manifest.json").exists()
    assert (data / STATE_NAME).is_file()

    rerun = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming after epoch" in rerun.stdout + rerun.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == list(range(1, 7))
    # The set was finished along the way, every shard once; shards made before the kill kept.
    manifest = json.loads((data / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == [shard_name(i) for i in range(6)]
    for name, inode in before.items():
        assert (data / name).stat().st_ino == inode, name
    assert len(SyntheticDataset(data)) == 96  # reusable by `synthkd distill --data`
    assert metrics["synthesize"] == "fast" and metrics["history"][-1]["synthetic_images"] == 96


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks on one GPU: NCCL refuses a shared device")
def test_two_ranks_make_one_fast_set(teacher_dir, tmp_path):
    out = tmp_path / "set"
    cmd = [
        *launcher(), "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(__import__("conftest").free_port()),
        "-m", "synthkd", "generate", "--teacher", str(teacher_dir), "--method", "fast", "--num-images", "48",
        "--batch-size", "16", "--steps-per-batch", "2", "--warmup-batches", "1", "--draws-per-adaptation", "1",
        "--out", str(out),
    ]
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    # Three shards over two ranks: rank 1 passes an empty batch in the second round and still
    # joins every all-reduce (the run would hang otherwise).
    assert [s["rank"] for s in manifest["shards"]] == [0, 1, 0]
    assert len(SyntheticDataset(out)) == 48
    # Warm-up batch + two rounds, each a Reptile step averaged over the ranks.
    state = FastGenerator(Classifier.from_pretrained(teacher_dir),
                          FastSettings(steps_per_batch=2, warmup_batches=1, draws_per_adaptation=1))
    state.load_state(out)
    assert state.batches == 3


def test_cli_refuses_bad_fast_synthesis_input(teacher_dir, synthetic_dir, tmp_path):
    common = ["--teacher", teacher_dir, "--out", tmp_path / "x"]
    line = error_line(invoke("generate", *common, "--method", "fast", "--num-images", "8", "--meta-lr", "2"))
    assert "--meta-lr" in line
    line = error_line(invoke("distill", *common, "--data", tmp_path / "d", "--synthesize", "fast", "--mode", "neighbourhood"))
    assert "--mode e2e" in line
    line = error_line(invoke("distill", *common, "--data", synthetic_dir, "--inputs", "activations"))
    assert "--mode neighbourhood" in line
    line = error_line(invoke("distill", *common, "--data", synthetic_dir, "--mode", "neighbourhood", "--inputs", "activations"))
    assert "not a synthkd activation-set manifest" in line
    line = error_line(invoke("generate", *common, "--method", "activations", "--num-images", "8", "--cuts", "nope"))
    assert "nope" in line


def test_competition_weight_is_one_flag_in_both_commands():
    """`generate --competition-weight` and `distill --synthesize fast --competition-weight`: one
    default (decided by whether there is a competitor) and one help text."""
    flags = [next(p for p in main.commands[name].params if "--competition-weight" in p.opts)
             for name in ("generate", "distill")]
    assert [flag.default for flag in flags] == [None, None] and flags[0].help == flags[1].help
    assert "1 with a competitor, 0 without" in flags[0].help
