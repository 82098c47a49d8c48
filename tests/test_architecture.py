"""The layers of the package (cli -> pipelines -> generators -> core, no cycles) as import-linter
contracts (.importlinter), and the registries a new part plugs into."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def installed_layout(tmp_path: Path) -> Path:
    """The checkout as it installs: generators/ and pipelines/ inside synthkd/ (import-linter reads
    a package from one folder, while setuptools maps these two from beside it)."""
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "synthkd", tmp_path / "synthkd", ignore=ignore)
    for name in ("generators", "pipelines"):
        shutil.copytree(ROOT / name, tmp_path / "synthkd" / name, ignore=ignore)
    return tmp_path


def test_import_contracts_hold(tmp_path):
    pytest.importorskip("importlinter")
    tree = installed_layout(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                               "sys.exit(lint_imports_command())", "--config", str(ROOT / ".importlinter")],
        cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
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
    import tomllib

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
