"""The Python API: `import synthkd` stays light, its functions are the stages, and the example
in README.md runs as written."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

import synthkd
from conftest import REPO, subprocess_env


def readme_api_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section holds one example"
    return blocks[0]


def test_import_synthkd_is_light_and_documents_its_functions():
    probe = "import sys, synthkd; print(sorted(m for m in ('torch', 'accelerate', 'click') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
    for name in ("load_model", "generate", "distill", "search", "calibrate", "evaluate"):
        assert callable(getattr(synthkd, name)) and getattr(synthkd, name).__doc__, name


def test_search_stays_the_function_after_its_subpackage_is_imported():
    import synthkd.search.explore  # noqa: F401  (binds the subpackage on its parent, which must not hide the function)
    from synthkd.search import Candidate

    assert callable(synthkd.search) and synthkd.search.__module__ == "synthkd" and Candidate.__name__ == "Candidate"


def test_settings_are_checked_together_with_a_suggestion(teacher_dir, synthetic_dir, tmp_path):
    with pytest.raises(synthkd.errors.SynthkdError, match="epoch: unknown key; did you mean epochs"):
        synthkd.distill(str(teacher_dir), synthetic_dir, tmp_path / "student", epoch=3)


@pytest.mark.slow
def test_readme_example_runs(teacher_dir, tmp_path, monkeypatch):
    shutil.copytree(teacher_dir, tmp_path / "teacher")  # what the README's train-teacher line makes
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_api_example(), "README.md", "exec"), namespace)
    metrics = namespace["metrics"]
    assert metrics["teacher"]["accuracy"] > 0.85 and metrics["student"]["accuracy"] > 0.3  # far above chance (0.1)
    assert (tmp_path / "student" / "model.safetensors").is_file() and (tmp_path / "detector").is_dir()
    assert namespace["report"]["num_images"] == 445  # all of digits:test
