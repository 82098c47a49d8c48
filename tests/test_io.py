"""Writes that fail half-way leave the previous state readable; outputs follow the umask; paths read
from a manifest stay inside its directory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from synthkd.errors import SynthkdError
from synthkd.io import atomic_write_json, inside, read_json

from conftest import REPO, subprocess_env

LIMITED = textwrap.dedent("""
    import resource, signal, sys
    limit = int(sys.argv[1])
    if sys.argv[2] == "ignore":  # the write then fails with EFBIG instead of the process being killed
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    exec(sys.argv[3])
""")


def run_limited(limit: int, on_limit: str, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a child that may write no file beyond ``limit`` bytes (``ulimit -f``)."""
    return subprocess.run([sys.executable, "-c", LIMITED, str(limit), on_limit, code], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("on_limit", ["killed", "ignore"])
def test_a_model_written_over_an_existing_one_past_the_file_size_limit(teacher_dir, tmp_path, on_limit):
    """The bigger model cannot be written whole: the process dies (SIGXFSZ) or the write raises; the
    old model directory is still the old model, byte for byte, and loads."""
    import shutil

    from synthkd.models import Classifier

    model = tmp_path / "model"
    shutil.copytree(teacher_dir, model)
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    bigger = ("from synthkd.models import Classifier, ModelConfig, InputFormat\n"
              "config = ModelConfig(arch='resnet20', arch_kwargs={'width': 2.0, 'in_channels': 1, 'num_classes': 10}, "
              "input=InputFormat(1, 8, 8), class_names=[str(i) for i in range(10)])\n"
              f"Classifier.from_config(config).save_pretrained({str(model)!r})\n")
    limit = max(len(data) for data in before.values()) + 4096
    result = run_limited(limit, on_limit, bigger)
    assert result.returncode != 0, "the write was meant to exceed the limit"
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    Classifier.from_pretrained(model)  # the previous model, readable


def test_a_generation_stopped_by_the_file_size_limit_resumes(teacher_dir, tmp_path):
    """Shards that were written stay valid; the rerun without the limit finishes the set."""
    from synthkd.data.reader import SyntheticDataset

    out = tmp_path / "set"
    command = ["generate", "--teacher", str(teacher_dir), "--num-images", "48", "--batch-size", "16", "--iterations", "2",
               "--out", str(out)]
    code = f"import sys; from synthkd.cli import main; sys.argv = ['synthkd', *{command!r}]; main()"
    # A shard of 16 8x8 images with logits is about 6 KB: room for the small files, not for a shard.
    result = run_limited(4096, "ignore", code)
    assert result.returncode == 2, result.stderr
    assert "error: a file would pass the file size limit (ulimit -f); nothing already written is lost" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not list(out.glob("shard-*.safetensors")), "no shard fits under the limit"
    assert not list(out.glob(".*.tmp")), "the half-written shard was removed"
    rerun = subprocess.run([sys.executable, "-m", "synthkd", *command], cwd=REPO, env=subprocess_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert len(SyntheticDataset(out)) == 48


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert read_json(tmp_path / "a.json") == {"x": 1}


@pytest.mark.parametrize("name", ["../x", "../../etc/passwd", "/etc/passwd", "a/../../x", "", "a\nb"])
def test_paths_leaving_a_directory_are_refused(tmp_path, name):
    with pytest.raises(SynthkdError, match="outside|invalid path"):
        inside(tmp_path / "set", name)


def test_paths_inside_and_links_out(tmp_path):
    directory = tmp_path / "set"
    (directory / "nb-00").mkdir(parents=True)
    assert inside(directory, "nb-00/shard-00000.safetensors") == directory / "nb-00" / "shard-00000.safetensors"
    (directory / "link").symlink_to(tmp_path)
    with pytest.raises(SynthkdError, match="outside"):
        inside(directory, "link/x")
