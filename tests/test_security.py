"""Loading a model directory never runs code its config.json names, unless the user opts in
(--trust-code, or naming the factory again with the directory's weights)."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from synthkd.cli import main
from synthkd.errors import SynthkdError
from synthkd.models import Classifier, trusting_code


def run(*args) -> "object":
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def rewrite_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture
def evil(tmp_path, teacher_dir, monkeypatch) -> Path:
    """The reproduction: a model directory whose arch is os:system, with no .py file in it."""
    monkeypatch.chdir(tmp_path)
    directory = tmp_path / "evil"
    shutil.copytree(teacher_dir, directory)
    rewrite_config(directory, arch="os:system", arch_kwargs={"command": f"touch {tmp_path / 'PWNED'}"})
    return directory


@pytest.fixture
def own_code(tmp_path, teacher_dir) -> tuple[Path, Path]:
    """A model directory whose arch is the user's own FILE.py:factory building the teacher's network."""
    factory = tmp_path / "mine.py"
    factory.write_text(textwrap.dedent("""
        from synthkd.models import create_model

        def build(**kwargs):
            return create_model("resnet8", **kwargs)
    """))
    directory = tmp_path / "mine"
    shutil.copytree(teacher_dir, directory)
    rewrite_config(directory, arch=f"{factory}:build")
    return directory, factory


@pytest.mark.parametrize("command", [
    ["evaluate", "--model", "{dir}", "--dataset", "digits:test[:8]"],
    ["generate", "--teacher", "{dir}", "--num-images", "4", "--batch-size", "4", "--iterations", "1", "--out", "{tmp}/set"],
    ["distill", "--teacher", "{dir}", "--data", "digits:test[:8]", "--epochs", "1", "--out", "{tmp}/student"],
    ["calibrate", "--model", "{dir}", "--data", "digits:test[:40]", "--out", "{tmp}/detector"],
])
def test_a_model_directory_naming_code_is_refused_and_runs_nothing(command, evil, tmp_path):
    result = run(*[part.format(dir=evil, tmp=tmp_path) for part in command])
    line = one_error_line(result)
    assert "names code (arch 'os:system')" in line and "--trust-code" in line
    assert not (tmp_path / "PWNED").exists()
    assert not any((tmp_path / name).exists() for name in ("set", "student", "detector"))


def test_a_student_directory_naming_code_is_refused(evil, teacher_dir, tmp_path):
    result = run("distill", "--teacher", teacher_dir, "--student", evil, "--data", "digits:test[:8]", "--epochs", "1",
                 "--out", tmp_path / "student")
    assert "names code" in one_error_line(result)
    assert not (tmp_path / "PWNED").exists()


def test_a_chain_source_naming_code_is_refused(evil, tmp_path):
    """Architectures nested in the config (a searched student's sources) are checked too."""
    rewrite_config(evil, arch="neighbourhood-chain",
                   arch_kwargs={"cuts": ["layer1"], "sources": [{"arch": "os:system", "arch_kwargs": {"command": "touch PWNED"}}] * 2})
    with pytest.raises(SynthkdError, match="names code"):
        Classifier.from_pretrained(evil)
    assert not (tmp_path / "PWNED").exists()


def test_trust_code_loads_the_users_own_factory(own_code, tmp_path):
    directory, _ = own_code
    assert "names code" in one_error_line(run("evaluate", "--model", directory, "--dataset", "digits:test[:8]"))
    result = run("evaluate", "--model", directory, "--dataset", "digits:test[:8]", "--trust-code", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_images"] == 8


def test_naming_the_factory_again_with_the_weights_loads_it(own_code):
    directory, factory = own_code
    config = json.loads((directory / "config.json").read_text())
    assert config["arch_kwargs"] == {"width": 0.5, "in_channels": 1, "num_classes": 10}
    # The factory given on the command line is called without arguments: wrap the saved ones.
    wrapper = factory.with_name("wrapper.py")
    wrapper.write_text(f"from mine import build\n\ndef made():\n    return build(**{config['arch_kwargs']!r})\n")
    import sys

    sys.path.insert(0, str(factory.parent))
    try:
        result = run("evaluate", "--model", f"{wrapper}:made", "--weights", directory / "model.safetensors",
                     "--input-shape", "1,8,8", "--dataset", "digits:test[:8]", "--json")
    finally:
        sys.path.remove(str(factory.parent))
    assert result.exit_code == 0, result.output


def test_trusting_code_in_python_and_run_trust_named_archs_only(own_code, evil, tmp_path):
    directory, factory = own_code
    with pytest.raises(SynthkdError, match="names code"):
        Classifier.from_pretrained(directory)
    with trusting_code(False, archs={f"{factory}:build"}):
        Classifier.from_pretrained(directory)
        with pytest.raises(SynthkdError, match="names code"):
            Classifier.from_pretrained(evil)
    with trusting_code():
        Classifier.from_pretrained(directory)
    assert not (tmp_path / "PWNED").exists()
