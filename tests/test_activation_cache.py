"""Neighbourhood distillation from the teacher's cached activations: students that keep the
teacher's interfaces, the cache in memory and on disk (round trip, resume after SIGKILL, a
changed key refused, a corrupt shard redone, a cache too big for the disk refused; split by rank
under 2 ranks, and resumed in 1 process after a rank is killed), the student spec grammar and its
mode defaults."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from synthkd.cli import main
from synthkd.data.activation_cache import ActivationCache
from synthkd.data.reader import SyntheticDataset
from synthkd.errors import SynthkdError
from synthkd.models.registry import parse_zoo_spec
from synthkd.neighbourhood_training import NeighbourhoodDistiller, NeighbourhoodSettings
from synthkd.pipelines.distill import DistillSettings, StudentSettings, build_student, data_fingerprint
from synthkd.teacher_activations import TeacherActivations

from conftest import REPO, free_port, launcher, run_killed_after_shards, subprocess_env

BLOCK_CUTS = ["stem", "layer1.0", "layer2.0", "layer3.0"]


def tree_hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def activations(teacher, synthetic_dir, accelerator, out, **settings) -> TeacherActivations:
    config = NeighbourhoodSettings(**{"cuts": "blocks", "seed": 0, "holdout": 8, **settings})
    student = build_student("resnet8:inner=0.5", teacher, width=0.5)
    distiller = NeighbourhoodDistiller(teacher, student, config, accelerator)
    dataset = SyntheticDataset(synthetic_dir)
    return TeacherActivations(teacher, distiller.teacher_split, dataset, config, data_fingerprint(synthetic_dir, dataset),
                              accelerator, out, needed=list(range(5)))


def test_zoo_spec_grammar_and_mode_defaults(teacher):
    assert parse_zoo_spec("resnet20:inner=0.5,blocks=1") == ("resnet20", {"inner": 0.5, "blocks": 1})
    assert parse_zoo_spec("resnet20") == ("resnet20", {})
    assert parse_zoo_spec("model.py:factory") is None
    with pytest.raises(SynthkdError, match="cannot read 'inner'"):
        parse_zoo_spec("resnet20:inner,blocks=1")
    student = StudentSettings(arch="resnet8")
    assert student.spec("e2e", teacher) == "resnet8:width=0.5"
    assert student.spec("neighbourhood", teacher) == "resnet8:width=0.5,inner=0.5"  # the teacher's width
    assert StudentSettings(arch="resnet8", width=0.25).spec("neighbourhood", teacher) == "resnet8:width=0.25"
    assert StudentSettings(arch="resnet8:inner=0.25").spec("neighbourhood", teacher) == "resnet8:inner=0.25,width=0.5"
    # naming inner keeps the mode's width, the teacher's (the README's example), also for a narrower teacher
    teacher.config.arch_kwargs["width"] = 0.25  # the fixture is this test's own copy
    assert StudentSettings(arch="resnet8:inner=0.5").spec("neighbourhood", teacher) == "resnet8:inner=0.5,width=0.25"
    assert StudentSettings(arch="resnet8:inner=0.5").spec("e2e", teacher) == "resnet8:inner=0.5,width=0.5"


def test_interface_keeping_student_starts_from_the_teacher_and_merges_without_adapters(teacher, accelerator,
                                                                                     synthetic_dir, tmp_path):
    student = build_student("resnet8:inner=0.5", teacher, width=0.5, from_teacher=True)
    teacher_params = sum(p.numel() for p in teacher.parameters())
    assert sum(p.numel() for p in student.parameters()) < 0.6 * teacher_params
    images = SyntheticDataset(synthetic_dir).images[:16]
    mine, theirs = student.net.state_dict(), teacher.net.state_dict()
    for name in ("stem.0.weight", "layer2.0.shortcut.0.weight", "layer3.0.bn2.running_var", "fc.weight"):
        assert torch.equal(mine[name], theirs[name])  # outside the blocks' middles: the teacher's own weights
    assert mine["layer1.0.conv1.weight"].shape[0] == theirs["layer1.0.conv1.weight"].shape[0] // 2
    config = NeighbourhoodSettings(cuts="blocks", epochs=2, batch_size=8, holdout=8, seed=0)
    distiller = NeighbourhoodDistiller(teacher, student, config, accelerator)
    assert distiller.channel_pairs == [None] * 5
    dataset = SyntheticDataset(synthetic_dir)
    report = distiller.train(dataset, tmp_path / "out", data_fingerprint(synthetic_dir, dataset))
    assert report["activation_cache"]["where"] == "memory"
    fmt = teacher.input_format
    with torch.no_grad():
        x = fmt.normalize(fmt.adapt(images))
        for neighbourhood in distiller.neighbourhoods.eval():
            x = neighbourhood(x)
        merged = distiller.merge().eval()
        assert merged is student and not merged.config.cut_adapters
        assert torch.allclose(merged(images), x, atol=1e-5)


def test_disk_cache_holds_what_memory_holds(teacher, synthetic_dir, accelerator, tmp_path):
    memory = activations(teacher, synthetic_dir, accelerator, tmp_path / "a", cache="memory", cache_views=2)
    disk = activations(teacher, synthetic_dir, accelerator, tmp_path / "b", cache="disk", cache_views=2)
    cache = ActivationCache(tmp_path / "b" / "activation-cache")
    assert cache.views == 2 and len(cache.shapes) == 6
    assert torch.equal(memory.train_rows, disk.train_rows) and len(memory.train_rows) == 2 * (40 - 8)
    for k in range(5):
        for a, b in zip(memory.pair(k), disk.pair(k)):
            assert torch.equal(a, b)
    # View 0 is the image as made: boundary 0 is the normalised synthetic image.
    fmt = teacher.input_format
    assert torch.allclose(memory.pair(0)[0][:40], fmt.normalize(fmt.adapt(SyntheticDataset(synthetic_dir).images)))
    assert not torch.equal(memory.pair(0)[0][:40], memory.pair(0)[0][40:])  # view 1 is augmented
    half = activations(teacher, synthetic_dir, accelerator, tmp_path / "c", cache="memory", cache_dtype="float16")
    assert half.pair(1)[1].dtype == torch.float16
    assert torch.allclose(half.pair(1)[1].float(), memory.pair(1)[1][:40], rtol=1e-2, atol=1e-2)


def distill_command(teacher_dir: Path, synthetic_dir: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "synthkd", "distill", "--teacher", str(teacher_dir), "--student", "resnet8",
            "--data", str(synthetic_dir), "--mode", "neighbourhood", "--epochs", "1", "--batch-size", "16",
            "--cache", "disk", "--cache-dir", str(cache), "--cache-views", "3", "--out", str(out), *extra]


def on_two_ranks(command: list[str]) -> list[str]:
    """A ``python -m synthkd ...`` command under ``accelerate launch`` with two CPU (or GPU) ranks."""
    return [*launcher(), "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", "2",
            "--num_machines", "1", "--main_process_port", str(free_port()), "-m", "synthkd", *command[3:]]


def run(command: list[str]):
    import subprocess

    return subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_killed_cache_build_resumes_to_the_same_bytes(teacher_dir, synthetic_dir, tmp_path):
    cache = tmp_path / "cache"
    run_killed_after_shards(distill_command(teacher_dir, synthetic_dir, tmp_path / "s1", cache), shards=7, timeout=300)
    assert not (cache / "manifest.json").exists() and len(list(cache.rglob("*.safetensors"))) == 7
    done = run(distill_command(teacher_dir, synthetic_dir, tmp_path / "s1", cache))
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = tmp_path / "fresh"
    done = run(distill_command(teacher_dir, synthetic_dir, tmp_path / "s2", fresh))
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, clean = tree_hashes(cache), tree_hashes(fresh)
    shards = [name for name in clean if name.endswith(".safetensors")]
    assert len(shards) == 6 * 3 and all(resumed[name] == clean[name] for name in shards)
    assert (tmp_path / "s1" / "activation-cache").exists() is False and cache.exists()  # an explicit cache is kept


def test_cache_of_other_settings_is_refused_and_a_corrupt_shard_redone(teacher_dir, synthetic_dir, tmp_path):
    cache = tmp_path / "cache"
    done = run(distill_command(teacher_dir, synthetic_dir, tmp_path / "s1", cache))
    assert done.returncode == 0, done.stderr[-3000:]
    before = tree_hashes(cache)
    done = run(distill_command(teacher_dir, synthetic_dir, tmp_path / "s2", cache, "--cache-views", "2"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "other settings" in done.stderr and "views" in done.stderr
    assert tree_hashes(cache) == before  # nothing overwritten
    damaged = cache / "b-02" / "v01-shard-00000.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-16] + b"\0" * 16)
    done = run(distill_command(teacher_dir, synthetic_dir, tmp_path / "s3", cache))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "b-02/v01-shard-00000.safetensors" in done.stderr  # named, then made again
    assert tree_hashes(cache) == before


def test_cache_bigger_than_the_free_disk_is_refused_before_writing(teacher_dir, synthetic_dir, tmp_path):
    result = CliRunner().invoke(main, [
        "distill", "--teacher", str(teacher_dir), "--student", "resnet8", "--data", str(synthetic_dir), "--mode",
        "neighbourhood", "--epochs", "1", "--cache", "disk", "--cache-views", "100000000",
        "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2, result.output
    assert "the activation cache needs" in result.stderr and "free" in result.stderr
    lines = result.stderr.strip().splitlines()  # the size announced on the log, then one error line
    assert len(lines) == 2 and "teacher activations:" in lines[0] and lines[1].startswith("error: the activation cache needs")
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_nd_lands_within_two_points_of_e2e_kd_on_digits(teacher, accelerator, tmp_path):
    """The digits setting: the default neighbourhood student (inner=0.5, from the teacher's
    channels), trained from cached activations and fine-tuned briefly, against e2e KD of the same
    student from fresh weights on the same images."""
    from synthkd.generators.inversion import ActivationInversion, InversionSettings
    from synthkd.pipelines.distill import distill
    from synthkd.pipelines.generate import generate

    data = tmp_path / "set"
    generate(teacher, ActivationInversion(teacher, InversionSettings(iterations=30)), 384, data, batch_size=128, seed=0,
             accelerator=accelerator)
    student = StudentSettings(arch="resnet8")
    common = {"batch_size": 64, "flip": False}
    _, e2e = distill(teacher, student, data, tmp_path / "e2e", DistillSettings(mode="e2e", epochs=30, init="random", **common),
                     eval_dataset="digits:test", accelerator=accelerator)
    _, nd = distill(teacher, student, data, tmp_path / "nd", DistillSettings(mode="neighbourhood", epochs=5, finetune_epochs=2,
                                                                            cache_views=2, **common),
                    eval_dataset="digits:test", accelerator=accelerator)
    assert not nd["student"].get("cut_adapters")
    assert nd["student"]["accuracy"] >= e2e["student"]["accuracy"] - 0.02, (nd["student"], e2e["student"])


def test_a_user_teacher_thinned_by_fx_distils_and_reloads(tmp_path, accelerator):
    """``--student teacher:inner=0.5`` for a teacher given as FILE.py:factory: the plain CNN is
    thinned inside each neighbourhood, keeps its interfaces, trains from cached activations and
    its model directory loads back once the user trusts the code it names."""
    import textwrap

    from synthkd.data import load_dataset
    from synthkd.models import Classifier, InputFormat, ModelConfig, import_factory, trusting_code
    from synthkd.pipelines.distill import distill

    factory = tmp_path / "plain.py"
    factory.write_text(textwrap.dedent("""
        from torch import nn

        def cnn():
            return nn.Sequential(
                nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                              nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
                nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()),
                nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)))
    """))
    spec = f"{factory}:cnn"
    teacher = Classifier(import_factory(spec)(), ModelConfig(arch=spec, input=InputFormat(1, 8, 8),
                                                             class_names=[str(i) for i in range(10)])).eval()
    data = load_dataset("digits:train[:64]")
    student, metrics = distill(teacher, StudentSettings(arch="teacher:inner=0.5"), "digits:train[:64]", tmp_path / "s",
                               DistillSettings(mode="neighbourhood", cuts="0,1", epochs=1, batch_size=16),
                               accelerator=accelerator)
    assert student.config.arch == "thinned" and student.config.arch_kwargs["kept"] == {"0.0": 8, "1.0": 16}
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    assert set(metrics["neighbourhoods"]) == {"0", "1", "head"}
    with pytest.raises(SynthkdError, match="trust-code"):  # its base names code: loading it needs the user's opt-in
        Classifier.from_pretrained(tmp_path / "s")
    with trusting_code():
        loaded = Classifier.from_pretrained(tmp_path / "s").eval()
    images = torch.stack([data[i].images for i in range(8)])
    with torch.no_grad():
        assert torch.allclose(loaded(images), student.eval()(images), atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks on one GPU: NCCL refuses a shared device")
def test_two_ranks_split_the_disk_cache_by_their_cuts(teacher_dir, synthetic_dir, tmp_path):
    """Under 2 ranks each boundary of the cache is made by one rank, the one whose neighbourhood it
    is the target of (the image by the rank training the first piece), and the cache is the same,
    byte for byte, as one process makes."""
    two, one = tmp_path / "two-cache", tmp_path / "one-cache"
    done = run(on_two_ranks(distill_command(teacher_dir, synthetic_dir, tmp_path / "s2", two, "--cache-views", "2")))
    assert done.returncode == 0, done.stderr[-3000:]
    done = run(distill_command(teacher_dir, synthetic_dir, tmp_path / "s1", one, "--cache-views", "2"))
    assert done.returncode == 0, done.stderr[-3000:]

    assignment = json.loads((tmp_path / "s2" / "metrics.json").read_text())["assignment"]
    names = BLOCK_CUTS + ["head"]
    owner = {names.index(name): int(rank) for rank, owned in assignment.items() for name in owned}
    assert set(owner.values()) == {0, 1}
    made_by = {}
    for shard in json.loads((two / "manifest.json").read_text())["shards"]:
        made_by.setdefault(int(shard["file"][2:4]), set()).add(shard["rank"])
    assert made_by == {b: {owner[max(b - 1, 0)]} for b in range(len(names) + 1)}
    for rank in (0, 1):  # a rank made only the targets of its neighbourhoods (and the image if it trains the first)
        made = {b for b, ranks in made_by.items() if rank in ranks}
        assert made <= {k + 1 for k, r in owner.items() if r == rank} | ({0} if owner[0] == rank else set())
    shards = [name for name in tree_hashes(one) if name.endswith(".safetensors")]
    assert len(shards) == 6 * 2 and all(tree_hashes(two)[name] == tree_hashes(one)[name] for name in shards)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks on one GPU: NCCL refuses a shared device")
def test_a_split_cache_killed_under_two_ranks_resumes_in_one_process(teacher_dir, synthetic_dir, tmp_path):
    """A rank SIGKILLed after its first shard stops the split build; one process then makes the
    rest, and the cache is the one a clean run makes."""
    import subprocess

    cache, fresh = tmp_path / "cache", tmp_path / "fresh"
    killed = subprocess.run(on_two_ranks(distill_command(teacher_dir, synthetic_dir, tmp_path / "s1", cache)), cwd=REPO,
                            env=subprocess_env(SYNTHKD_KILL_AFTER_SHARDS="1"), capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and not (cache / "manifest.json").exists()
    assert 0 < len(list(cache.rglob("*.safetensors"))) < 6 * 3
    for out, directory in ((tmp_path / "s1", cache), (tmp_path / "s2", fresh)):
        done = run(distill_command(teacher_dir, synthetic_dir, out, directory))
        assert done.returncode == 0, done.stderr[-3000:]
    shards = [name for name in tree_hashes(fresh) if name.endswith(".safetensors")]
    assert len(shards) == 6 * 3 and all(tree_hashes(cache)[name] == tree_hashes(fresh)[name] for name in shards)
