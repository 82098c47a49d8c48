"""The Student Search command."""

from __future__ import annotations

import click

from synthkd.pipelines.search import SearchSettings

from ..accelerator import accelerated
from .base import accelerator_options, loader_options, main, model_options, one_writer, open_model, tagged
from .options import settings_options


@main.command()
@tagged(model_options("teacher", "--teacher-weights"), spec="model")
@click.option("--data", required=True, type=click.Path(), help="Synthetic set directory from `synthkd generate`.")
@settings_options(SearchSettings, "settings")
@click.option("--seed", type=int, default=0, show_default=True, help="Initial weights, batch order and augmentation.")
@tagged(click.option("--eval-dataset", help="Dataset spec to report accuracy on, e.g. fashion-mnist:test."), spec="dataset")
@accelerator_options(tracking=True)
@loader_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Student model directory to write.")
@one_writer
def search(model_spec, weights, input_shape, mean, std, data, settings, seed, eval_dataset, device, out):
    """Find the student with the least error under a budget (Student Search)."""
    from synthkd.pipelines.search import search as run_search

    teacher = open_model(model_spec, weights, input_shape, mean, std)
    hyperparameters = {**settings.to_dict(), "data": data, "seed": seed}
    with accelerated(device, "search", out, hyperparameters) as accelerator:
        _, report = run_search(teacher, data, out, settings, seed, eval_dataset, accelerator)
    if accelerator.is_main_process:
        for row in report["chosen"]:
            click.echo(f"{row['neighbourhood']:>10}  {row['candidate']:<16} relative MSE {row['relative_mse']:.4f}")
        click.echo(f"cost {report['chosen_costs'][report['kind']]:.6g} {report['kind']} (limit {report['limit']:.6g}); "
                   f"{report['trained']} pieces trained, {report['cached']} from the cache")
        if "student" in report:
            click.echo(f"teacher {report['teacher']['accuracy']:.4f}  student {report['student']['accuracy']:.4f} on {eval_dataset}")
