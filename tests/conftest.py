"""Shared fixtures: a tiny trained teacher, a small synthetic set, and helpers for subprocesses
and hand-written dataset files. Everything is real (no mocks) and sized for a 2-core CPU."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Tiny models run fastest on one thread, and several threads on a loaded 2-core machine spin
# against each other (a 4 ms step becomes 0.7 s). SYNTHKD_TEST_THREADS overrides.
THREADS = int(os.environ.get("SYNTHKD_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)

REPO = Path(__file__).resolve().parent.parent

# The tiny teacher: resnet8 at width 0.5 (8/16/32 channels) on 8x8 digits, ~2 s of training.
# Width 0.25 or fewer epochs train even faster, but such a teacher (test accuracy 0.84) is too
# weak for the inversion test: its own inverted images reach only 0.83-0.93 accuracy.
TEACHER_ARCH = "resnet8"
TEACHER_WIDTH = 0.5
TEACHER_EPOCHS = 8


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for `python -m synthkd` / `accelerate launch` children: PATH and the rest of
    ours, one thread each, and the checkout importable even if the package were not installed."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(THREADS)
    env["MKL_NUM_THREADS"] = str(THREADS)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def run_killed_after_shards(command: list[str], shards: int, timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` with ``SYNTHKD_KILL_AFTER_SHARDS=shards``: the shard writer SIGKILLs the
    process right after it commits that many shards, as a crash would, whatever the speed of the
    machine. Fails the test unless the process died that way."""
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(SYNTHKD_KILL_AFTER_SHARDS=str(shards)),
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != -signal.SIGKILL:
        pytest.fail(f"expected a SIGKILL after {shards} shards, the process exited with {result.returncode}: "
                    f"{result.stderr[-3000:]}")
    return result


def launcher() -> list[str]:
    """``accelerate launch``, or the same module run by this Python where the script is not on PATH."""
    accelerate = shutil.which("accelerate")
    return [accelerate, "launch"] if accelerate else [sys.executable, "-m", "accelerate.commands.launch"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_idx(path: Path, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` (uint8) in the IDX format of (Fashion-)MNIST, gzip'd if the name ends in .gz."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.tobytes()
    compress = path.suffix == ".gz" if compress is None else compress
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_fashion_mnist(root: Path, split: str = "train", n: int = 20, gz: bool = True, seed: int = 0):
    """A small Fashion-MNIST-shaped IDX pair; returns (images N x 28 x 28, labels N)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if gz else ""
    write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


@pytest.fixture(scope="session")
def accelerator():
    """The Accelerator the CLI makes (CPU ranks where there is no GPU); it is a process-wide singleton."""
    from synthkd.cli import make_accelerator

    return make_accelerator()


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, accelerator) -> Path:
    """A model directory: resnet8 x0.5 trained 8 epochs on digits:train (test accuracy ~0.96)."""
    from synthkd.pipelines.train_teacher import TeacherSettings, train_teacher

    out = tmp_path_factory.mktemp("teacher") / "model"
    settings = TeacherSettings(arch=TEACHER_ARCH, width=TEACHER_WIDTH, epochs=TEACHER_EPOCHS, batch_size=64, flip=False)
    _, metrics = train_teacher("digits:train", settings, out, seed=0, eval_dataset="digits:test", accelerator=accelerator)
    # Far above chance, or every test built on this teacher would prove little.
    assert metrics["eval"]["accuracy"] > 0.85, metrics["eval"]
    return out


@pytest.fixture
def teacher(teacher_dir):
    """A fresh copy of the tiny teacher for each test (tests may move or modify it)."""
    from synthkd.models import Classifier

    return Classifier.from_pretrained(teacher_dir).eval()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory, teacher_dir, accelerator) -> Path:
    """A finished synthetic set of 40 images (shards of 16, 16, 8) from the tiny teacher. Read-only:
    tests that damage it copy it first."""
    from synthkd.generators.inversion import ActivationInversion, InversionSettings
    from synthkd.models import Classifier
    from synthkd.pipelines.generate import generate

    teacher = Classifier.from_pretrained(teacher_dir)
    out = tmp_path_factory.mktemp("synthetic") / "set"
    generator = ActivationInversion(teacher, InversionSettings(iterations=5))
    generate(teacher, generator, 40, out, batch_size=16, seed=0, accelerator=accelerator)
    return out


@pytest.fixture
def python() -> str:
    return sys.executable
