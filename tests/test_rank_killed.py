"""A rank killed during two-process neighbourhood training: the other one is stopped within a
bounded time, the neighbourhoods finished before the kill are kept, and a rerun trains only the rest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port, subprocess_env
from conftest import launcher


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the launcher's ranks and their helpers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rank_process(launcher_pid: int, rank: int) -> int | None:
    for pid in descendants(launcher_pid):
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environment and b"LOCAL_RANK=" + str(rank).encode() in environment:
            return pid
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks through /proc")
@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks on one GPU: NCCL refuses a shared device")
def test_a_rank_killed_during_neighbourhood_training(teacher_dir, synthetic_dir, tmp_path):
    out = tmp_path / "student"
    args = ["distill", "--teacher", str(teacher_dir), "--student", "resnet8", "--data",
            # Enough epochs that the kill lands while the ranks still train (each neighbourhood trains
            # alone from cached activations, a few milliseconds per epoch on this set).
            str(synthetic_dir), "--mode", "neighbourhood", "--epochs", "300", "--finetune-epochs", "0", "--batch-size", "8",
            "--seed", "3", "--out", str(out)]
    launch = [*launcher(), "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", str(free_port()), "-m", "synthkd", *args]
    process = subprocess.Popen(launch, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list((out / "neighbourhoods").glob("*.json")):  # a neighbourhood is finished
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no neighbourhood finished in 300 s"
            time.sleep(0.1)
        victim = rank_process(process.pid, 1)
        assert victim is not None, "rank 1 not found"
        finished = sorted(p.name for p in (out / "neighbourhoods").glob("*.json"))
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = process.communicate(timeout=120)
        stopped_after = time.monotonic() - killed
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode != 0
    assert stopped_after < 60, f"rank 0 ran on {stopped_after:.0f} s after rank 1 was killed"
    assert "SIGKILL" in stderr and "rank      : 1" in stderr, stderr[-3000:]  # the launcher names the failed rank
    assert not (out / "model.safetensors").exists()
    kept = sorted(p.name for p in (out / "neighbourhoods").glob("*.json"))
    assert set(finished) <= set(kept)

    rerun = subprocess.run([sys.executable, "-m", "synthkd", *args], cwd=REPO, env=subprocess_env(), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    records = json.loads((out / "metrics.json").read_text())["neighbourhoods"]
    reused = {name for name, record in records.items() if record.get("resumed")}
    assert len(reused) == len(kept) and len(records) > len(kept), records  # only the rest was trained
