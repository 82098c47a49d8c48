"""``synthkd export``: a model as ONNX, TorchScript or a torch.export program, checked against PyTorch."""

from __future__ import annotations

from pathlib import Path

import click

from synthkd.pipelines.export import CONSTANT_PROBES, ExportSettings

from .base import main, model_options, open_model, tagged
from .options import settings_options


@main.command()
@tagged(model_options("model", "--weights"), spec="model")
@settings_options(ExportSettings, "settings")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the probe batch.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="File to write (and FILE.json beside it).")
def export(model_spec, weights, input_shape, mean, std, settings, seed, out):
    """Export a model to share it: it takes [0,1] images of the model's input shape and returns logits."""
    from synthkd.pipelines.export import export_model

    record = export_model(open_model(model_spec, weights, input_shape, mean, std), out, settings, seed,
                          model_dir=model_spec if Path(model_spec).is_dir() else None)
    click.echo(f"wrote {out} ({settings.format}, input N x {'x'.join(map(str, record['input_shape']))} in [0,1]); "
               f"max abs difference from PyTorch on {settings.probe_batch} random and {len(CONSTANT_PROBES)} constant probe images: "
               f"{record['max_abs_diff']:.3g}")
