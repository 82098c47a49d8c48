"""Every example command in the README (and docs/) runs, in the order written, at tiny scale: the
commands are read from the bash blocks and only sizes change (epochs, images, iterations, batch sizes),
the datasets become slices of digits and resnet20 becomes resnet8; the spec grammar, the flags and
every default stay as written, so an example cannot silently break again. Commands that need the
network, files the README does not make, several GPUs or minutes are listed in SKIPPED, with why."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from synthkd.cli import main

from conftest import REPO

pytestmark = pytest.mark.slow

# The value of each size flag at tiny scale.
TINY = {"--epochs": "1", "--num-images": "32", "--iterations": "2", "--batch-size": "16", "--max-steps": "2", "--steps": "2",
        "--finetune-epochs": "1", "--steps-per-batch": "2", "--teacher-views": "2", "--components": "2"}
# Whole tokens (or their prefixes) replaced: real data by slices of digits, resnet20 by resnet8.
DATASETS = [("fashion-mnist:train", "digits:train[:256]"), ("fashion-mnist:test[:100]", "digits:test[:40]"),
            ("fashion-mnist:test", "digits:test[:64]")]
# The same sizes for `synthkd run` (overrides appended after the README's own).
RUN_TINY = ["teacher.epochs=1", "teacher.dataset=digits:train[:256]", "generate.num_images=32", "generate.batch_size=16",
            "generate.iterations=2", "distill.epochs=1", "distill.batch_size=16", "eval_dataset=digits:test[:64]",
            "detector.limit=40", "search.epochs=1", "search.finetune_epochs=0", "report.samples_per_class=1"]
# What does not run here, by the start of the command.
SKIPPED = {
    "synthkd generate --teacher torchvision:resnet18?weights=DEFAULT": "downloads ImageNet weights",
    "synthkd distill --teacher torchvision:resnet18?weights=DEFAULT": "downloads ImageNet weights",
    "synthkd evaluate --model hf:models/vit-tiny-pets": "a local Hugging Face model the README does not make",
    "synthkd evaluate --model torchvision:resnet18?num_classes=10 --weights my.safetensors": "the user's own weights and CIFAR-10",
    "synthkd distill --teacher hub:repos/my-models": "a local torch.hub repository the README does not make",
    "synthkd demo": "minutes of training (tests/test_cli.py runs the demo's stages)",
}


# Each runs in a directory of its own: the README's summary, then docs/ (commands.md first: its
# commands make what the other pages use).
DOCUMENTS = {"README": [REPO / "README.md"],
             "docs": [REPO / "docs" / "commands.md", *sorted(set((REPO / "docs").glob("*.md")) - {REPO / "docs" / "commands.md"})]}


def readme_commands(paths: list[Path]) -> list[list[str]]:
    """The ``synthkd`` commands of the bash blocks of ``paths``, in order, as argument lists."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", "\n".join(path.read_text() for path in paths), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for start in range(len(words)):  # `bash setup.sh && synthkd demo`: from the synthkd
                if words[start] == "synthkd" and (start == 0 or words[start - 1] == "&&"):
                    commands.append(words[start:])
                    break
    return commands


def skip_reason(words: list[str]) -> str | None:
    text = " ".join(words)
    return next((why for start, why in SKIPPED.items() if text.startswith(start)), None)


def tiny(words: list[str]) -> list[str]:
    """The command at tiny scale (see the module docstring)."""
    out = []
    for index, word in enumerate(words):
        if index and words[index - 1] in TINY:
            word = TINY[words[index - 1]]
        for real, small in DATASETS:
            word = word.replace(real, small) if not word.startswith("configs/") else word
        out.append(word.replace("resnet20", "resnet8"))
    if out[1] == "run":
        out += RUN_TINY
    return out


COMMANDS = {name: readme_commands(paths) for name, paths in DOCUMENTS.items()}


def test_the_documents_have_their_examples():
    assert all(words[0] == "synthkd" for commands in COMMANDS.values() for words in commands)
    assert sum(skip_reason(words) is None for words in COMMANDS["docs"]) > 30 and len(COMMANDS["README"]) > 10


@pytest.mark.parametrize("document", list(DOCUMENTS))
def test_every_example_runs_at_tiny_scale(document, tmp_path, monkeypatch):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    for words in COMMANDS[document]:
        if skip_reason(words):
            continue
        args = tiny(words)
        result = CliRunner().invoke(main, args[1:])
        assert result.exit_code == 0, (" ".join(words), args, result.output, result.exception)
