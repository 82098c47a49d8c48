"""One writer per output directory: a second process writing the same directory is refused at once
(exit 2, one line naming the first one's process id) and the first one's output stays valid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synthkd.data.reader import SyntheticDataset
from synthkd.io import LOCK_NAME, exclusive_directory

from conftest import REPO, subprocess_env


def synthkd(*args) -> list[str]:
    return [sys.executable, "-m", "synthkd", *map(str, args)]


def wait_for_lock(directory: Path, pid: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until ``pid`` is written in the directory's lock file (the writer holds the lock)."""
    deadline = time.monotonic() + timeout
    lock = directory / LOCK_NAME
    while time.monotonic() < deadline:
        if lock.is_file() and lock.read_text().strip() == str(pid):
            return
        if process.poll() is not None:
            pytest.fail(f"the first writer ended before it held the lock: {process.communicate()}")
        time.sleep(0.05)
    pytest.fail(f"{pid} did not take the lock of {directory} in {timeout} s")


def test_two_generate_processes_on_one_directory(teacher_dir, tmp_path):
    """The reproduction: two `synthkd generate` with the same --out at the same time."""
    out = tmp_path / "gc"
    command = synthkd("generate", "--teacher", teacher_dir, "--num-images", 64, "--batch-size", 16, "--iterations", 60,
                      "--no-flip", "--seed", 5, "--out", out)
    first = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lock(out, first.pid, first)
        # The first writer is paused while the second runs, so it outlives the second however long
        # the second takes to start on a busy machine.
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        first_still_running = first.poll() is None
    finally:
        os.kill(first.pid, signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=600)
    assert first_still_running, "the test needs the first writer to outlive the second"
    assert second.returncode == 2, second.stderr
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {out} is being written by process {first.pid}; wait for it to finish or write somewhere else"]
    assert first.returncode == 0, stderr
    dataset = SyntheticDataset(out)  # every shard's checksum verified
    assert len(dataset) == 64
    rerun = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr  # the lock is free once the writer is done


HOLD = ("import sys, time; from synthkd.io import exclusive_directory\n"
        "with exclusive_directory(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)")


@pytest.mark.parametrize("command", [
    ["train-teacher", "--dataset", "digits:train", "--epochs", "1", "--out", "{out}"],
    ["distill", "--teacher", "{teacher}", "--data", "digits:test[:8]", "--epochs", "1", "--out", "{out}"],
    ["calibrate", "--model", "{teacher}", "--data", "digits:test[:40]", "--out", "{out}"],
    ["search", "--teacher", "{teacher}", "--data", "digits:test[:8]", "--out", "{out}"],
    ["train-diffusion", "--dataset", "digits:train", "--out", "{out}"],
    ["evaluate", "--model", "{teacher}", "--dataset", "digits:test[:8]", "--detector", "{teacher}", "--out", "{out}"],
    ["run", "{config}"],
])
def test_every_writing_command_is_refused_while_another_process_writes(command, teacher_dir, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(f"out: {out}\nteacher:\n  model: {teacher_dir}\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = [part.format(out=out, teacher=teacher_dir, config=config) for part in command]
        result = subprocess.run(synthkd(*args), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"is being written by process {holder.pid}" in lines[0], result.stderr
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def test_nested_use_in_one_process_and_cleanup(tmp_path):
    out = tmp_path / "new"
    with exclusive_directory(out):
        with exclusive_directory(out):
            assert (out / LOCK_NAME).is_file()
    assert not out.exists()  # created, nothing written: removed again
    with exclusive_directory(out):
        (out / "kept").write_text("x")
    assert (out / "kept").is_file()
