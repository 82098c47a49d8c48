"""`-h` a newcomer can read: every option of every command says what it does, generate and distill
list their options by method, and the model and dataset spec grammars are shown where options
take them."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from synthkd.cli import main


def commands() -> list[tuple[str, click.Command]]:
    return [("synthkd", main), *((f"synthkd {name}", command) for name, command in sorted(main.commands.items()))]


@pytest.mark.parametrize("name,command", commands(), ids=[name for name, _ in commands()])
def test_every_option_has_a_help_line(name, command):
    missing = [param.opts[0] for param in command.params
               if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip()]
    assert not missing, f"{name}: options without help: {', '.join(missing)}"


def help_of(*args: str) -> str:
    result = CliRunner().invoke(main, [*args, "-h"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def sections(text: str) -> dict[str, str]:
    """Headed sections of a help text (a line ending in ':' at the margin opens one)."""
    found, title = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            found[title] = ""
        elif title is not None:
            found[title] += line + "\n"
    return found


def test_generate_help_groups_options_by_method():
    parts = sections(help_of("generate"))
    assert "--steps-per-batch" in parts["--method fast: a meta-learned generator network"]
    assert "--pipeline" in parts["--method diffusion: sample a diffusers pipeline"]
    assert "--activation-lr" in parts["--method activations: each neighbourhood's input activations"]
    assert "--bn-weight" in parts["Inversion objective (--method inversion and fast)"]
    assert "--min-confidence" in parts["Selection by the teacher (any method)"]
    assert "--teacher " in parts["Teacher"] and "--tracker" in parts["Run"]
    assert "--pipeline" not in parts["--method fast: a meta-learned generator network"]


def test_distill_help_groups_options_by_mode():
    parts = sections(help_of("distill"))
    assert "--finetune-epochs" in parts["--mode neighbourhood"] and "--inputs" in parts["--mode neighbourhood"]
    assert "--augment" in parts["--mode e2e"]
    assert "--gen-batch-size" in parts["--synthesize fast: make the set into --data while the student trains"]
    assert "--student-width" in parts["Student"] and "--temperature" in parts["Distillation (both modes)"]


@pytest.mark.parametrize("command", ["generate", "distill", "search", "calibrate", "evaluate"])
def test_model_spec_grammar_is_in_the_help_of_commands_that_take_a_model(command):
    from synthkd.models.specs import model_spec_help

    parts = sections(help_of(command))
    for form, _ in model_spec_help():
        assert form in parts["Model specs"]


@pytest.mark.parametrize("command", ["train-teacher", "distill", "search", "calibrate", "evaluate", "detect",
                                     "train-diffusion"])
def test_dataset_spec_grammar_lists_every_registered_kind(command):
    from synthkd.data import dataset_kinds

    parts = sections(help_of(command))
    for kind in dataset_kinds().values():
        assert kind.usage in parts["Dataset specs"]
    assert "SPEC[START:STOP]" in parts["Dataset specs"]
