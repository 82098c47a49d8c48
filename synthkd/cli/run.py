"""``synthkd run CONFIG``: every stage from one YAML file (see pipelines/run.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click

from ..accelerator import AcceleratorSettings, accelerated, make_accelerator
from ..errors import SynthkdError
from ..io import exclusive_directory
from .base import main, trust_code_option
from .options import settings_options


@main.command("run")
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and what each stage would do; run nothing.")
@click.option("--force", is_flag=True, help="Reuse a run directory made by another config (changed stages rerun).")
@click.option("--quiet", is_flag=True, help="No progress bars or stage lines on the terminal (the log file keeps them).")
@click.option("--plan", "size", is_flag=True,
              help="Neighbourhood mode: print what the distill stage will cost (as `synthkd distill --plan`); run nothing.")
@click.option("--plan-ranks", type=click.IntRange(min=1), help="With --plan: the number of ranks to plan for "
                                                               "(default: the processes launched).")
@click.option("--json", "as_json", is_flag=True, help="With --plan: print the plan as JSON.")
@settings_options(AcceleratorSettings, "device", only=("tracker",))
@trust_code_option
def run_command(config_file, overrides, dry_run, force, quiet, size, plan_ranks, as_json, device):
    """Run the stages CONFIG asks for; a rerun skips finished ones and resumes interrupted ones.

    Overrides set any key, parsed as YAML: `synthkd run configs/digits_quick.yaml distill.epochs=5`."""
    import yaml

    from synthkd.pipelines.config import load_config
    from synthkd.pipelines.run import check_run_dir, describe_plan, plan, run_pipeline, size_distillation

    config = load_config(config_file, overrides)  # every problem at once, before anything runs
    if (plan_ranks or as_json) and not size:
        raise SynthkdError("--plan-ranks and --json describe the plan; use them with --plan")
    if size:
        from synthkd.neighbourhood_plan import plan_lines

        accelerator = make_accelerator(config.mixed_precision)
        found = size_distillation(config, accelerator, plan_ranks or accelerator.num_processes)
        if accelerator.is_main_process:
            click.echo(json.dumps(found, indent=2) if as_json else "\n".join(plan_lines(found)))
        return
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
    with exclusive_directory(run_dir), accelerated(device, "synthkd-run", run_dir, config.to_dict()) as accelerator:
        summary = run_pipeline(config, accelerator, force=force, quiet=quiet)
    if accelerator.is_main_process and not quiet:
        click.echo(json.dumps({k: v for k, v in summary.items() if k not in ("per_class", "stages")}, indent=2))
