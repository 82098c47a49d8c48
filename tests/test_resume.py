"""A real `synthkd generate` process killed with SIGKILL right after its third shard (by the
writer's SYNTHKD_KILL_AFTER_SHARDS fault injection, so the test does not depend on the child's
speed), then rerun: the set completes with every shard exactly once, the shards made before the
kill are kept, and the result is what an uninterrupted run makes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from synthkd.data.format import shard_name
from synthkd.data.reader import SyntheticDataset
from synthkd.generators.inversion import ActivationInversion, InversionSettings
from synthkd.models import Classifier
from synthkd.pipelines.generate import generate

from conftest import REPO, run_killed_after_shards, subprocess_env

NUM_IMAGES, BATCH, ITERATIONS = 128, 8, 20  # 16 shards of 8, ~0.15 s each on one core
NUM_SHARDS = NUM_IMAGES // BATCH
KILLED_AFTER = 3


def command(teacher_dir, out) -> list[str]:
    return [
        sys.executable, "-m", "synthkd", "generate", "--teacher", str(teacher_dir), "--num-images", str(NUM_IMAGES),
        "--batch-size", str(BATCH), "--iterations", str(ITERATIONS), "--seed", "1", "--out", str(out),
    ]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_generate_resumes_after_sigkill(teacher_dir, tmp_path, accelerator):
    out = tmp_path / "set"
    run_killed_after_shards(command(teacher_dir, out), KILLED_AFTER, 120)

    # Killed mid-run: not finished, exactly the shards committed before the kill.
    assert not (out / "manifest.json").exists()
    assert (out / "run.json").exists()
    before = {p.name: p.stat().st_ino for p in out.glob("shard-*.safetensors")}
    assert sorted(before) == [shard_name(i) for i in range(KILLED_AFTER)]
    with pytest.raises(Exception, match="interrupted"):
        SyntheticDataset(out)

    rerun = subprocess.run(command(teacher_dir, out), cwd=REPO, env=subprocess_env(), capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"wrote {NUM_IMAGES} images in {NUM_SHARDS} shards" in rerun.stdout

    manifest = json.loads((out / "manifest.json").read_text())
    files = [s["file"] for s in manifest["shards"]]
    assert files == [shard_name(i) for i in range(NUM_SHARDS)]  # every shard, once, in order
    assert sorted(p.name for p in out.glob("shard-*.safetensors")) == files
    assert [s["count"] for s in manifest["shards"]] == [BATCH] * NUM_SHARDS
    assert manifest["num_images"] == NUM_IMAGES
    assert manifest["counts_per_class"] == [NUM_IMAGES // 10 + (1 if c < NUM_IMAGES % 10 else 0) for c in range(10)]
    assert not list(out.rglob(".*.tmp"))  # temp files of the killed write are cleaned up
    # Shards finished before the kill were kept, not remade (a rewrite is a new file).
    for name, inode in before.items():
        assert (out / name).stat().st_ino == inode, name

    data = SyntheticDataset(out)
    assert len(data) == NUM_IMAGES
    assert torch.bincount(data.targets, minlength=10).tolist() == manifest["counts_per_class"]

    # The interrupted-and-resumed set equals an uninterrupted one (seeds are per shard).
    teacher = Classifier.from_pretrained(teacher_dir)
    reference = tmp_path / "reference"
    generate(teacher, ActivationInversion(teacher, InversionSettings(iterations=ITERATIONS)), NUM_IMAGES, reference,
             batch_size=BATCH, seed=1, accelerator=accelerator)
    expected = SyntheticDataset(reference)
    assert torch.equal(data.targets, expected.targets)
    assert torch.allclose(data.images, expected.images, atol=1e-5)
    assert torch.allclose(data.logits, expected.logits, atol=1e-4)
