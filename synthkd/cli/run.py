"""``synthkd run CONFIG``: every stage from one YAML file (see pipelines/run.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click

from ..accelerator import AcceleratorSettings, accelerated
from ..errors import SynthkdError
from .base import main
from .options import settings_options


@main.command("run")
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and what each stage would do; run nothing.")
@click.option("--force", is_flag=True, help="Reuse a run directory made by another config (changed stages rerun).")
@click.option("--quiet", is_flag=True, help="No progress bars or stage lines on the terminal (the log file keeps them).")
@settings_options(AcceleratorSettings, "device", only=("tracker",))
def run_command(config_file, overrides, dry_run, force, quiet, device):
    """Run the stages CONFIG asks for; a rerun skips finished ones and resumes interrupted ones.

    Overrides set any key, parsed as YAML: `synthkd run configs/digits_quick.yaml distill.epochs=5`."""
    import yaml

    from synthkd.pipelines.config import load_config
    from synthkd.pipelines.run import check_run_dir, describe_plan, plan, run_pipeline

    config = load_config(config_file, overrides)  # every problem at once, before anything runs
    run_dir = Path(config.out)
    quiet = quiet or click.get_current_context().find_root().params.get("quiet", 0) > 0  # `synthkd -q run`
    if dry_run:
        click.echo(yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())
        try:
            check_run_dir(config, run_dir, force)
        except SynthkdError as refusal:
            click.echo(f"\nthe run would be refused: {refusal}\nwith --force:", nl=False)
        click.echo(f"\nstages (run directory {run_dir}):\n{describe_plan(plan(config, run_dir))}")
        return
    device = replace(device, mixed_precision=config.mixed_precision)
    with accelerated(device, "synthkd-run", run_dir, config.to_dict()) as accelerator:
        summary = run_pipeline(config, accelerator, force=force, quiet=quiet)
    if accelerator.is_main_process and not quiet:
        click.echo(json.dumps({k: v for k, v in summary.items() if k not in ("per_class", "stages")}, indent=2))
