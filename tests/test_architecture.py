"""The layers of the package (cli -> pipelines -> generators -> core, no cycles) as import-linter
contracts (.importlinter), and the registries a new part plugs into."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    """``lint-imports`` as a user runs it in the checkout (synthkd/generators and synthkd/pipelines
    are links to the folders beside it, so the package reads as it installs)."""
    pytest.importorskip("importlinter")
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                               "sys.exit(lint_imports_command())"],
        cwd=ROOT, capture_output=True, text=True,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_only_the_intended_packages_import():
    import importlib.util

    for name in ("synthkd.generators", "synthkd.pipelines", "synthkd.cli"):
        assert importlib.util.find_spec(name) is not None
    for stray in ("synthkd.tests", "synthkd.benchmarks", "synthkd.synthkd", "synthkd.configs"):
        assert importlib.util.find_spec(stray) is None


def test_every_package_folder_is_installed():
    """A sub-package missing from pyproject's list imports from a checkout (editable install) but
    not from a wheel; the list must name every folder that holds an __init__.py."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(project["packages"])
    roots = {package: Path(folder) for package, folder in project["package-dir"].items()}
    found = set()
    for package, folder in roots.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            if not any(p for p in roots if p != package and p.startswith(package + ".") and init.is_relative_to(ROOT / roots[p])):
                found.add(".".join((package, *parts)))
    assert found == listed


def test_the_code_passes_the_linter():
    """ruff's pyflakes and pycodestyle rules (pyproject.toml [tool.ruff]) over the whole repository."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
