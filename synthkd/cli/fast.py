"""Options of fast synthesis: the meta-learned generator (``generate --method fast``), making data
while distilling (``distill --synthesize fast``) and per-neighbourhood activations
(``generate --method activations``, ``distill --mode neighbourhood --inputs activations``)."""

from __future__ import annotations

from typing import Any, Callable

import click

from .base import add_options


def fast_generator_options(function: Callable) -> Callable:
    """The settings of the meta-learned generator (``--method fast`` / ``--synthesize fast``)."""
    return add_options(function, [
        click.option("--steps-per-batch", type=int, default=20, show_default=True,
                     help="Fast generator: optimisation steps per batch, from the meta-learned weights."),
        click.option("--generator-lr", type=float, default=0.005, show_default=True,
                     help="Fast generator: Adam learning rate on its weights within a batch."),
        click.option("--latent-lr", type=float, default=0.015, show_default=True,
                     help="Fast generator: Adam learning rate on each batch's latents."),
        click.option("--meta-lr", type=float, default=0.5, show_default=True,
                     help="Fast generator: Reptile step, the fraction of the way to a batch's adapted weights."),
        click.option("--bn-momentum", type=float, default=0.9, show_default=True,
                     help="Fast generator: weight of past batches in the BN statistics a batch must match."),
        click.option("--warmup-batches", type=int, default=0, show_default=True,
                     help="Fast generator: meta-learning batches before the first shard (not kept)."),
        click.option("--latent-dim", type=int, default=128, show_default=True, help="Fast generator: latent size."),
        click.option("--generator-channels", type=int, default=16, show_default=True, help="Fast generator: width."),
        click.option("--draws-per-adaptation", type=int, default=4, show_default=True,
                     help="Fast generator: batches drawn from one adapted generator; after the adapted batch, "
                          "each redraw costs one forward pass (its latents: fitted ones of the class plus noise)."),
        click.option("--latent-noise", type=float, default=0.25, show_default=True,
                     help="Fast generator: std of the noise on a redraw's latents (larger: more varied, less on target)."),
    ])


def activation_options(function: Callable) -> Callable:
    """Settings of ``generate --method activations``."""
    return add_options(function, [
        click.option("--cuts", "activation_cuts", default="blocks", show_default=True,
                     help="Activations: where the teacher is cut (blocks, stages or module paths), as for distill."),
        click.option("--activation-lr", type=float, default=0.1, show_default=True,
                     help="Activations: Adam learning rate on the activations."),
        click.option("--lookahead-weight", type=float, default=1.0, show_default=True,
                     help="Activations: weight of the next neighbourhood's BN statistics on the output."),
    ])


def synthesis_options(function: Callable) -> Callable:
    """``distill`` options to make the data during distillation, or to train on activations."""
    return add_options(function, [
        click.option("--synthesize", type=click.Choice(["none", "fast"]), default="none", show_default=True,
                     help="fast: make new batches into --data with the fast generator while the student "
                          "trains (e2e), the student being the competitor; resumable, the set reusable."),
        click.option("--num-images", "synth_images", type=int, default=24576, show_default=True,
                     help="--synthesize: the size of the set made into --data."),
        click.option("--gen-batch-size", type=int, default=256, show_default=True,
                     help="--synthesize: images per generated batch (and shard)."),
        click.option("--batches-per-round", type=int, default=2, show_default=True,
                     help="--synthesize: new batches per rank before each epoch."),
        click.option("--competition-weight", type=float, default=1.0, show_default=True,
                     help="--synthesize: weight of the competition term (seek inputs where the student disagrees)."),
        fast_generator_options,
        click.option("--inputs", type=click.Choice(["images", "activations"]), default="images", show_default=True,
                     help="Neighbourhood mode: train on images, or on a per-neighbourhood activation set "
                          "from `generate --method activations` (no image at all)."),
    ])


def run_interleaved(teacher, student, data, out, train, temperature, flip, mixup, seed, eval_dataset, accelerator,
                    options: dict[str, Any]):
    """``distill --synthesize fast``: the student is both trained and the generator's competitor."""
    from synthkd.generators.fast import build_fast_generator
    from synthkd.generators.inversion import InversionLossConfig
    from synthkd.pipelines.interleave import distill_interleaved

    loss = vars(InversionLossConfig(competition_weight=options["competition_weight"]))
    generator = build_fast_generator(teacher.to(accelerator.device), loss, student.to(accelerator.device), seed, options)
    return distill_interleaved(teacher, student, generator, data, out, options["synth_images"], options["gen_batch_size"],
                               options["batches_per_round"], train, temperature, flip, mixup, seed, eval_dataset,
                               accelerator)


def run_activations(teacher, num_images: int, batch_size: int, iterations: int, seed: int, out, accelerator,
                    options: dict[str, Any]) -> dict[str, Any]:
    """``generate --method activations``: one input set per neighbourhood of the teacher."""
    from synthkd.generators.activations import ActivationConfig
    from synthkd.pipelines.activations import generate_activations

    config = ActivationConfig(iterations=iterations, lr=options["activation_lr"], cuts=options["activation_cuts"],
                              lookahead_weight=options["lookahead_weight"])
    return generate_activations(teacher, config, num_images, out, batch_size, seed, accelerator)
