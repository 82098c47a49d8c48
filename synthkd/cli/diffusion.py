"""Diffusion commands: `train-diffusion`, and the report of the teacher's selection that
`generate` prints (useful with diffusion)."""

from __future__ import annotations

from typing import Any

import click

from ..accelerator import accelerated
from ..pipelines.train_diffusion import DiffusionTrainSettings
from .base import accelerator_options, main, tagged
from .options import settings_options


def echo_report(manifest: dict[str, Any]) -> None:
    """Per class: the share wanted, how many the selection accepted, how many filled the gap."""
    report = manifest.get("report")
    if not report:
        return
    click.echo(f"selection: {sum(report['drawn'])} images drawn in {report['tries']} tries")
    wanted = report.get("wanted", ["-"] * len(report["accepted"]))
    for name, share, accepted, filled, drawn in zip(manifest["teacher"]["class_names"], wanted, report["accepted"],
                                                    report["filled"], report["drawn"]):
        click.echo(f"  {name:>14}  wanted {share:>5}  accepted {accepted:>5}  filled with rejects {filled:>5}  "
                   f"drawn {drawn:>6}")


@main.command("train-diffusion")
@tagged(click.option("--dataset", required=True, help="Dataset spec, e.g. fashion-mnist:train."), spec="dataset")
@settings_options(DiffusionTrainSettings, "settings")
@accelerator_options(tracking=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Pipeline directory to write.")
def train_diffusion_command(dataset, settings, device, out):
    """Train a small unconditional DDPM and save it as a diffusers pipeline (resumes if stopped)."""
    from synthkd.pipelines.train_diffusion import train_diffusion

    with accelerated(device, "train-diffusion", out, {**settings.to_dict(), "dataset": dataset}) as accelerator:
        metrics = train_diffusion(dataset, out, settings, accelerator)
    if accelerator.is_main_process:
        click.echo(f"trained {metrics['steps']} steps (final loss {metrics['history'][-1]['loss']:.4f}); "
                   f"DDPMPipeline.from_pretrained({out!r}) loads it")
