"""The Student Search command."""

from __future__ import annotations

import click

from .base import main, make_accelerator, mixed_precision_option, model_options, open_model


@main.command()
@model_options("teacher", "--teacher-weights")
@click.option("--data", required=True, type=click.Path(), help="Synthetic set directory from `synthkd generate`.")
@click.option("--budget", required=True,
              help="params|flops|latency=VALUE: a fraction of the teacher's cost (params=0.3, flops=25%) or absolute "
                   "(params=50000, flops=2e6, latency=1.5ms).")
@click.option("--candidates", default="width=0.25,0.5,0.75,1.0", show_default=True,
              help="Grid 'width=...;depth=...;sparsity=...' over the teacher's architecture, or FILE.py:factory.")
@click.option("--cuts", default="stages", show_default=True,
              help="Where to cut into neighbourhoods: stages (needed for depth candidates), blocks, or module paths.")
@click.option("--epochs", type=int, default=5, show_default=True, help="Distillation epochs of every candidate piece.")
@click.option("--sparsity-epochs", type=int, help="Re-distillation epochs after pruning (default: half of --epochs).")
@click.option("--finetune-epochs", type=int, default=0, show_default=True, help="End-to-end KD epochs after the merge.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=0.01, show_default=True, help="Adam learning rate of every piece.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-dataset", help="Dataset spec to report accuracy on, e.g. fashion-mnist:test.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Where distilled candidates are kept (default: $SYNTHKD_CACHE/search or ~/.cache/synthkd/search).")
@mixed_precision_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Student model directory to write.")
def search(model_spec, weights, input_shape, mean, std, data, budget, candidates, cuts, epochs, sparsity_epochs, finetune_epochs,
           batch_size, lr, seed, eval_dataset, cache_dir, mixed_precision, out):
    """Find the student with the least error under a budget (Student Search)."""
    from synthkd.neighbourhood_training import NeighbourhoodConfig
    from synthkd.pipelines.search import search as run_search
    from synthkd.search import parse_budget
    from synthkd.training import TrainConfig

    parsed = parse_budget(budget)
    teacher = open_model(model_spec, weights, input_shape, mean, std)
    accelerator = make_accelerator(mixed_precision)
    config = NeighbourhoodConfig(cuts=cuts, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    finetune = TrainConfig(epochs=finetune_epochs, batch_size=batch_size, lr=0.01, seed=seed, warmup_epochs=0.0)
    _, report = run_search(teacher, data, out, parsed, candidates, config, sparsity_epochs, finetune, eval_dataset, cache_dir,
                           accelerator)
    if accelerator.is_main_process:
        for row in report["chosen"]:
            click.echo(f"{row['neighbourhood']:>10}  {row['candidate']:<16} relative MSE {row['relative_mse']:.4f}")
        click.echo(f"cost {report['chosen_costs'][parsed.kind]:.6g} {parsed.kind} (limit {report['limit']:.6g}); "
                   f"{report['trained']} pieces trained, {report['cached']} from the cache")
        if "student" in report:
            click.echo(f"teacher {report['teacher']['accuracy']:.4f}  student {report['student']['accuracy']:.4f} on {eval_dataset}")
