"""Stage: Student Search. Distill every candidate piece of every neighbourhood once (cached), pick
one per neighbourhood with the least summed local error under a budget, merge, optionally
fine-tune end to end, and save the student with a report of the choice and the frontier."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch.utils.data import Dataset

from synthkd.accelerator import make_accelerator
from synthkd.data import load_dataset
from synthkd.evaluation import evaluate
from synthkd.io import atomic_write_json
from synthkd.models import Classifier
from synthkd.neighbourhood_training import NeighbourhoodConfig
from synthkd.search import DEFAULT_CANDIDATES, Budget, Exploration, candidate_space, parse_budget, select
from synthkd.search.costs import describe, measure_latency
from synthkd.search.explore import hold_at_zero
from synthkd.search.knapsack import no_student_fits
from synthkd.search.report import plot_frontier
from synthkd.training import TrainConfig

from .distill import data_fingerprint, finish, kd_finetune, open_training_data


def default_cache_dir() -> Path:
    """``$SYNTHKD_CACHE/search``, else ``~/.cache/synthkd/search``: shared by searches of any budget."""
    root = os.environ.get("SYNTHKD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "synthkd"
    return Path(root) / "search"


def explore(
    teacher: Classifier, data: str | os.PathLike, candidates: str = DEFAULT_CANDIDATES, config: NeighbourhoodConfig | None = None,
    sparsity_epochs: int | None = None, cache_dir: str | os.PathLike | None = None, accelerator: Accelerator | None = None,
    budget: Budget | None = None,
) -> Exploration:
    """Every candidate piece distilled (or read from the cache) with its local error and costs.
    A parameter or FLOPs ``budget`` that no student can meet fails before any training."""
    accelerator = accelerator or make_accelerator()
    config = config or NeighbourhoodConfig(cuts="stages")
    space = candidate_space(candidates, teacher)
    training_data = open_training_data(data, teacher, accelerator)
    exploration = Exploration(teacher, space, config, max(1, config.epochs // 2) if sparsity_epochs is None else sparsity_epochs,
                              accelerator)
    if budget is not None and budget.kind in ("params", "flops"):
        least, teacher_cost = exploration.cost_lower_bound(budget.kind)
        limit = budget.limit(teacher_cost)
        if least > limit:
            raise no_student_fits(describe(budget.kind, limit),
                                  f"the cheapest piece of every neighbourhood together costs {describe(budget.kind, least)}")
    exploration.distill(training_data, data_fingerprint(data, training_data), Path(cache_dir) if cache_dir else default_cache_dir())
    return exploration


def finetune_merged(
    exploration: Exploration, student: Classifier, choice: tuple[int, ...], training_data: Dataset, finetune: TrainConfig,
    accelerator: Accelerator, evaluation: Dataset | None = None,
) -> dict[str, Any]:
    """End-to-end KD of an assembled student; the pruned entries of its pruned pieces stay zero."""
    hooks = hold_at_zero(exploration.pruned_masks(student, choice))
    try:
        return kd_finetune(exploration.teacher, student, training_data, exploration.config, finetune, accelerator, evaluation)
    finally:
        for hook in hooks:
            hook.remove()


def search(
    teacher: Classifier,
    data: str | os.PathLike,
    out: str | os.PathLike,
    budget: str | Budget,
    candidates: str = DEFAULT_CANDIDATES,
    config: NeighbourhoodConfig | None = None,
    sparsity_epochs: int | None = None,
    finetune: TrainConfig | None = None,
    eval_dataset: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    accelerator: Accelerator | None = None,
) -> tuple[Classifier, dict[str, Any]]:
    """Search, merge, optionally fine-tune; save the student, ``metrics.json``, ``report.json``
    and ``frontier.png`` to ``out``. Every rank selects the same student from the costs the main
    process measured; the main process alone writes."""
    accelerator = accelerator or make_accelerator()
    budget = parse_budget(budget) if isinstance(budget, str) else budget  # a bad budget fails before any training
    config = config or NeighbourhoodConfig(cuts="stages")
    evaluation = load_dataset(eval_dataset) if eval_dataset else None
    started = time.perf_counter()
    exploration = explore(teacher, data, candidates, config, sparsity_epochs, cache_dir, accelerator, budget)
    explore_seconds = time.perf_counter() - started
    limit = budget.limit(exploration.teacher_costs[budget.kind])
    frontier = exploration.frontier(budget.kind)
    chosen = select(frontier, limit, lambda value: describe(budget.kind, value))
    student = exploration.assemble(chosen.choice)
    # Whole-network latency, beside the summed latency of the pieces the budget is counted in.
    whole_latency = {name: measure_latency(model.net, exploration.activations[0], accelerator.device)
                     for name, model in (("student", student), ("teacher", teacher))}
    options = [o for options in exploration.options for o in options]
    uniform = {name: (exploration.total_costs(choice), sum(exploration.options[k][i].relative_mse for k, i in enumerate(choice)))
               for name, choice in exploration.uniform_choices().items()}
    report: dict[str, Any] = {
        "budget": str(budget), "kind": budget.kind, "limit": limit, "teacher_costs": exploration.teacher_costs,
        "cuts": exploration.cuts, "candidates": [asdict(c) for c in exploration.space], "config": asdict(config),
        "sparsity_epochs": exploration.sparsity_epochs,
        "chosen": exploration.describe(chosen.choice), "chosen_costs": exploration.total_costs(chosen.choice),
        "choice": list(chosen.choice), "chosen_error": chosen.error, "whole_network_latency": whole_latency,
        "frontier": [{"cost": s.cost, "error": s.error, "candidates": [exploration.options[k][i].candidate.name for k, i in enumerate(s.choice)]}
                     for s in frontier],
        "uniform": {name: {"costs": costs, "error": error} for name, (costs, error) in uniform.items()},
        "options": {exploration.names[k]: [{"candidate": o.candidate.name, "same_piece_as": o.candidates, "relative_mse": o.relative_mse,
                                            "costs": o.costs, "cached": o.resumed, "seconds": o.seconds, "rank": o.rank}
                                           for o in opts]
                    for k, opts in enumerate(exploration.options)},
        "trained": sum(not o.resumed for o in options), "cached": sum(o.resumed for o in options),
        "explore_seconds": explore_seconds, "num_processes": accelerator.num_processes,
    }
    training_data = open_training_data(data, teacher, accelerator)
    metrics: dict[str, Any] = {"mode": "search", "data": str(data), "budget": str(budget), "chosen_costs": report["chosen_costs"],
                               "explore_seconds": explore_seconds, "num_processes": accelerator.num_processes}
    if evaluation is not None:
        metrics["merged"] = evaluate(student, evaluation, accelerator)
    if finetune is not None and finetune.epochs > 0:
        metrics.update(finetune_merged(exploration, student, chosen.choice, training_data, finetune, accelerator, evaluation))
    student, metrics = finish(teacher, student, metrics, out, evaluation, eval_dataset, accelerator)
    for key in ("merged", "student", "teacher", "eval_dataset", "finetune_seconds"):
        if key in metrics:
            report[key] = metrics[key]
    if accelerator.is_main_process:
        atomic_write_json(Path(out) / "report.json", report)
        plot_frontier(Path(out) / "frontier.png", budget.kind, frontier, chosen, limit,
                      {name: (costs[budget.kind], error) for name, (costs, error) in uniform.items()})
    accelerator.wait_for_everyone()
    return student, report
