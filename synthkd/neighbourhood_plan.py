"""Neighbourhood distillation sized before it runs (``synthkd distill --plan``): each
neighbourhood's parameters, FLOPs and measured step time, their balance across the ranks, the
activation cache's bytes per rank on disk and in memory, and the time the requested epochs will
take. Nothing is trained or written; the figures come from the very pieces, probes, balancing
and cache layout a run uses, so the plan and the run agree.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .data.activation_cache import boundaries_of, boundary_builders, cache_bytes, computed_boundaries
from .data.format import MANIFEST_NAME
from .models.neighbourhoods import evaluating
from .models.born import count_flops
from .neighbourhood_training import NeighbourhoodDistiller, balance, batch_of, best_seconds, replicate
from .teacher_activations import (cache_directory, cache_location, human, require_cache_fits, require_free_disk)


def plan_neighbourhoods(distiller: NeighbourhoodDistiller, num_images: int, num_ranks: int, out: str | Path,
                        finetune_epochs: int = 0, repeats: int = 3) -> dict[str, Any]:
    """The plan of ``distiller``'s run on ``num_images`` images over ``num_ranks`` ranks.

    Refuses (:class:`~synthkd.errors.SynthkdError`) a disk cache that the disk cannot hold, saying
    by how much, and an existing cache whose shape at a cut is not what the neighbourhoods take."""
    config = distiller.config
    batch = config.batch_size
    step_seconds = distiller.step_costs(batch=batch, repeats=repeats)
    teacher_seconds = _teacher_forward_seconds(distiller, batch, repeats)
    assignment = balance(step_seconds, num_ranks)
    ranks = replicate(assignment, step_seconds)

    holdout = min(config.holdout, num_images // 5)
    rows = config.cache_views * num_images
    steps_per_epoch = max(1, config.cache_views * (num_images - holdout) // batch)
    shapes = [tuple(distiller.probes[0].shape[1:])] + [_output_shape(n, x) for n, x in zip(distiller.neighbourhoods,
                                                                                            distiller.probes)]
    boundary_bytes = [cache_bytes([shape], num_images, config.cache_views, config.cache_dtype) for shape in shapes]
    total_bytes = sum(boundary_bytes)
    where = cache_location(config.cache, total_bytes)
    directory = cache_directory(config, out)
    if where == "disk":
        require_cache_fits(directory, shapes, distiller.names, distiller.kept_channels)
        if not (directory / MANIFEST_NAME).is_file():
            require_free_disk(directory, total_bytes)

    needs = [[k for k, owners in enumerate(ranks) if rank in owners] for rank in range(num_ranks)]
    sliced = [False, *(channels is not None for channels in distiller.kept_channels), False]
    builders = boundary_builders(needs, len(shapes))
    per_rank = []
    for rank, owned in enumerate(needs):
        read = boundaries_of(owned)
        if where == "disk":  # the rank makes the boundaries it is the builder of, each from the one before
            made = [b for b, builder in enumerate(builders) if builder == rank]
            computed = computed_boundaries(made, sliced)
        else:  # every rank runs the teacher up to the deepest boundary it trains on
            made = computed = list(range(max(read) + 1)) if read else []
        train = sum(config.epochs * steps_per_epoch * step_seconds[k] / len(ranks[k]) for k in owned)
        cache = sum(rows * teacher_seconds[b - 1] / batch for b in computed if b > 0)
        per_rank.append({
            "rank": rank, "neighbourhoods": [distiller.names[k] for k in owned], "boundaries_read": read,
            "boundaries_made": made, "disk_bytes": sum(boundary_bytes[b] for b in made) if where == "disk" else 0,
            "memory_bytes": sum(boundary_bytes[b] for b in read), "cache_seconds": cache, "train_seconds": train,
        })
    finetune = _finetune_seconds(distiller, finetune_epochs, num_images, num_ranks, repeats)
    slowest = max(per_rank, key=lambda r: r["cache_seconds"] + r["train_seconds"])
    return {
        "num_images": num_images, "views": config.cache_views, "holdout": holdout, "batch_size": batch,
        "epochs": config.epochs, "steps_per_epoch": steps_per_epoch, "num_ranks": num_ranks,
        "neighbourhoods": [{
            "name": name, "parameters": sum(p.numel() for p in neighbourhood.parameters()),
            "flops_per_image": count_flops(neighbourhood, probe[:1]), "step_seconds": step_seconds[k],
            "ranks": ranks[k], "input_shape": list(shapes[k]), "output_shape": list(shapes[k + 1]),
        } for k, (name, neighbourhood, probe) in enumerate(zip(distiller.names, distiller.neighbourhoods, distiller.probes))],
        "cache": {"where": where, "dtype": config.cache_dtype, "bytes": total_bytes, "boundary_bytes": boundary_bytes,
                  **({"directory": str(directory)} if where == "disk" else {})},
        "ranks": per_rank,
        "estimate": {"slowest_rank": slowest["rank"], "cache_seconds": slowest["cache_seconds"],
                     "train_seconds": slowest["train_seconds"], "finetune_seconds": finetune,
                     "seconds": slowest["cache_seconds"] + slowest["train_seconds"] + finetune},
    }


@torch.no_grad()
def _output_shape(neighbourhood: torch.nn.Module, probe: torch.Tensor) -> tuple[int, ...]:
    with evaluating(neighbourhood):
        return tuple(neighbourhood(probe).shape[1:])


@torch.no_grad()
def _teacher_forward_seconds(distiller: NeighbourhoodDistiller, batch: int, repeats: int) -> list[float]:
    """Seconds of each teacher piece's forward pass on a batch: the cost of making its boundary."""
    timed = []
    for piece, probe in zip(distiller.teacher_split.pieces, distiller.teacher_probes):
        x = batch_of(probe, batch)
        timed.append(best_seconds(lambda: piece(x), repeats, x.device))
    return timed


def _finetune_seconds(distiller: NeighbourhoodDistiller, epochs: int, num_images: int, num_ranks: int,
                      repeats: int) -> float:
    """The end-to-end KD after the merge: a teacher forward and a student step per batch, the
    batches shared by the ranks."""
    if epochs == 0:
        return 0.0
    batch = distiller.config.batch_size
    fmt = distiller.teacher.input_format
    images = torch.rand(batch, *fmt.shape, device=distiller.probes[0].device)
    student = distiller.student
    with evaluating(student):
        step = best_seconds(lambda: student(images).float().pow(2).mean().backward(), repeats, images.device)
        student.zero_grad(set_to_none=True)
    with torch.no_grad():
        teacher = best_seconds(lambda: distiller.teacher(images), repeats, images.device)
    return epochs * math.ceil(num_images / (batch * num_ranks)) * (step + teacher)


def plan_lines(plan: dict[str, Any]) -> list[str]:
    """The plan as a table for the terminal."""
    cache, estimate = plan["cache"], plan["estimate"]
    lines = [f"neighbourhood plan: {len(plan['neighbourhoods'])} neighbourhoods on {plan['num_ranks']} rank(s); "
             f"{plan['num_images']} images x {plan['views']} view(s) ({plan['holdout']} held out), batch "
             f"{plan['batch_size']}, {plan['epochs']} epoch(s) of {plan['steps_per_epoch']} steps each",
             f"  {'neighbourhood':<16}{'parameters':>12}{'MFLOPs/image':>14}{'step ms':>10}  {'input -> output':<28}ranks"]
    for n in plan["neighbourhoods"]:
        shapes = f"{'x'.join(map(str, n['input_shape']))} -> {'x'.join(map(str, n['output_shape']))}"
        lines.append(f"  {n['name']:<16}{n['parameters']:>12,}{n['flops_per_image'] / 1e6:>14.3f}"
                     f"{n['step_seconds'] * 1e3:>10.2f}  {shapes:<28}{','.join(map(str, n['ranks']))}")
    where = f"disk at {cache['directory']}" if cache["where"] == "disk" else "memory (every rank its own boundaries)"
    lines.append(f"activation cache: {human(cache['bytes'])} in {cache['dtype']}, {len(cache['boundary_bytes'])} "
                 f"boundaries, in {where}")
    for r in plan["ranks"]:
        lines.append(f"  rank {r['rank']}: trains {', '.join(r['neighbourhoods']) or 'nothing'}; makes boundaries "
                     f"{_ranges(r['boundaries_made'])}, reads {_ranges(r['boundaries_read'])}; "
                     f"{human(r['disk_bytes'])} on disk, {human(r['memory_bytes'])} in memory; "
                     f"cache {r['cache_seconds']:.1f} s + training {r['train_seconds']:.1f} s")
    finetune = f" + fine-tune {estimate['finetune_seconds']:.1f} s" if estimate["finetune_seconds"] else ""
    lines.append(f"estimated time: {estimate['seconds']:.1f} s (rank {estimate['slowest_rank']}: cache "
                 f"{estimate['cache_seconds']:.1f} s + training {estimate['train_seconds']:.1f} s{finetune})")
    return lines


def _ranges(boundaries: list[int]) -> str:
    """[0, 1, 2, 5] as '0-2,5'."""
    parts: list[str] = []
    for b in boundaries:
        if parts and b == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{b}"
        else:
            parts.append(str(b))
    return ",".join(parts) or "none"
