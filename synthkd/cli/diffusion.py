"""Diffusion commands: `train-diffusion`, and the report of the teacher's selection that
`generate` prints (useful with diffusion)."""

from __future__ import annotations

from typing import Any

import click

from ..errors import SynthkdError
from .base import main, make_accelerator, mixed_precision_option


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
@click.option("--dataset", required=True, help="Dataset spec, e.g. fashion-mnist:train.")
@click.option("--epochs", type=int, default=2, show_default=True)
@click.option("--max-steps", type=int, help="Optimiser steps (overrides --epochs).")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="AdamW learning rate.")
@click.option("--image-size", type=int, default=32, show_default=True, help="Side the images are resized to.")
@click.option("--block-out-channels", default="16,32,64", show_default=True, help="UNet widths, one per level.")
@click.option("--seed", type=int, default=0, show_default=True)
@mixed_precision_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Pipeline directory to write.")
def train_diffusion_command(dataset, epochs, max_steps, batch_size, lr, image_size, block_out_channels, seed,
                            mixed_precision, out):
    """Train a small unconditional DDPM and save it as a diffusers pipeline (resumes if stopped)."""
    from synthkd.pipelines.train_diffusion import DiffusionTrainConfig, train_diffusion

    try:
        widths = tuple(int(w) for w in block_out_channels.split(","))
    except ValueError:
        raise SynthkdError(f"--block-out-channels must be comma-separated integers, got {block_out_channels!r}")
    config = DiffusionTrainConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
                                  image_size=image_size, block_out_channels=widths, seed=seed)
    accelerator = make_accelerator(mixed_precision)
    metrics = train_diffusion(dataset, out, config, accelerator)
    if accelerator.is_main_process:
        click.echo(f"trained {metrics['steps']} steps (final loss {metrics['history'][-1]['loss']:.4f}); "
                   f"DDPMPipeline.from_pretrained({out!r}) loads it")
