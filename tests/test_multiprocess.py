"""`accelerate launch` with two ranks (CPU processes over gloo where there is no GPU) making one
synthetic set: each rank writes its own shards, together exactly the planned set."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from synthkd.data.format import shard_name
from synthkd.data.reader import SyntheticDataset
from synthkd.generators.inversion import ActivationInversion, InversionSettings
from synthkd.models import Classifier
from synthkd.pipelines.generate import generate

from conftest import REPO, free_port, launcher, subprocess_env

NUM_IMAGES, BATCH, ITERATIONS = 64, 16, 5


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks on one GPU: NCCL refuses a shared device")
def test_two_ranks_generate_one_set(teacher_dir, tmp_path, accelerator):
    out = tmp_path / "set"
    cmd = [
        *launcher(), "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "synthkd", "generate", "--teacher", str(teacher_dir), "--num-images", str(NUM_IMAGES),
        "--batch-size", str(BATCH), "--iterations", str(ITERATIONS), "--out", str(out),
    ]
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    # Only the main process reports.
    assert done.stdout.count(f"wrote {NUM_IMAGES} images in 4 shards") == 1, done.stdout

    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == [shard_name(i) for i in range(4)]
    # Round-robin: rank 0 made shards 0 and 2, rank 1 shards 1 and 3.
    assert [s["rank"] for s in manifest["shards"]] == [0, 1, 0, 1]
    assert sorted(p.name for p in (out / "progress").iterdir()) == ["rank-0.json", "rank-1.json"]
    assert sorted(p.name for p in out.glob("shard-*")) == [shard_name(i) for i in range(4)]
    assert manifest["num_images"] == NUM_IMAGES
    assert manifest["counts_per_class"] == [7] * 4 + [6] * 6

    data = SyntheticDataset(out, verify=True)
    assert len(data) == NUM_IMAGES
    assert torch.bincount(data.targets, minlength=10).tolist() == manifest["counts_per_class"]
    teacher = Classifier.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        assert torch.allclose(data.logits, teacher(data.images), atol=1e-4)

    # The BatchNorm statistics were all-reduced: a rank's shards are optimised against the
    # statistics of both ranks' batches, so they differ from the same shards made by one
    # process (which, with per-shard seeds, would otherwise be identical).
    single = tmp_path / "single"
    generate(teacher, ActivationInversion(teacher, InversionSettings(iterations=ITERATIONS)), NUM_IMAGES, single,
             batch_size=BATCH, seed=0, accelerator=accelerator)
    alone = SyntheticDataset(single)
    assert torch.equal(alone.targets, data.targets)
    assert not torch.allclose(alone.images[:BATCH], data.images[:BATCH], atol=1e-3)
