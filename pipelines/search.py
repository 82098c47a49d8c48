"""Stage: Student Search. Distill every candidate piece of every neighbourhood once (cached), pick
one per neighbourhood with the least summed local error under a budget, merge, optionally
fine-tune end to end, and save the student with a report of the choice and the frontier."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch.utils.data import Dataset

from synthkd.accelerator import make_accelerator
from synthkd.data import load_dataset
from synthkd.evaluation import evaluate
from synthkd.io import atomic_write_json
from synthkd.models import Classifier
from synthkd.neighbourhood_training import NEIGHBOURHOOD_LR, NeighbourhoodSettings
from synthkd.search import DEFAULT_CANDIDATES, Budget, Exploration, candidate_space, parse_budget, select
from synthkd.search.costs import describe, measure_latency
from synthkd.models.pruning import hold_at_zero
from synthkd.search.knapsack import Solution, no_student_fits
from synthkd.search.report import plot_frontier
from synthkd.settings import Settings, directory_problem, refusal, setting
from synthkd.training import TrainSettings

from .distill import data_fingerprint, finetune_settings, finish, kd_finetune, open_training_data


@dataclass
class SearchSettings(Settings):
    """Student Search (``synthkd search``, the ``search:`` section of ``synthkd run``): the student
    with the least local error under ``budget``, picked per neighbourhood from a candidate grid."""

    budget: str = setting("params=0.5", check=refusal(parse_budget),
                          help="params|flops|latency=VALUE: a fraction of the teacher's cost (params=0.3, flops=25%) or "
                               "absolute (params=50000, flops=2e6, latency=1.5ms).")
    candidates: str = setting(DEFAULT_CANDIDATES,
                              help="Grid 'inner=...;width=...;depth=...;sparsity=...' over the teacher's architecture (inner: thinner "
                                   "inside each block, the teacher's interfaces kept), or FILE.py:factory.")
    cuts: str = setting("stages", help="Where to cut into neighbourhoods: stages (needed for depth candidates), blocks, "
                                       "or module paths.")
    epochs: int = setting(5, help="Distillation epochs of every candidate piece.", positive=True)
    sparsity_epochs: int | None = setting(None, positive=True,
                                          help="Re-distillation epochs after pruning (default: half of --epochs).")
    finetune_epochs: int = setting(0, help="End-to-end KD epochs after the merge.", at_least=0)
    finetune_lr: float = setting(0.01, help="SGD learning rate of the fine-tune.", positive=True)
    batch_size: int = setting(128, help="Images per optimiser step.", positive=True)
    lr: float = setting(NEIGHBOURHOOD_LR, help="Adam learning rate of every piece.", positive=True)
    cache_dir: str | None = setting(None, check=directory_problem,
                                    help="Where distilled candidates are kept, shared by searches of any budget "
                                         "(default: $SYNTHKD_CACHE/search or ~/.cache/synthkd/search; "
                                         "synthkd run: RUN_DIR/search-cache).")

    def pieces(self, seed: int) -> NeighbourhoodSettings:
        """How every candidate piece is distilled."""
        # adapters: candidates of other widths are joined by 1x1 convolutions where a choice mixes them.
        return NeighbourhoodSettings(cuts=self.cuts, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=seed,
                                     adapters=True)

    def pruned_epochs(self) -> int:
        return max(1, self.epochs // 2) if self.sparsity_epochs is None else self.sparsity_epochs

    def finetune(self, seed: int) -> TrainSettings:
        return finetune_settings(self.finetune_epochs, self.batch_size, self.finetune_lr, seed)


def default_cache_dir() -> Path:
    """``$SYNTHKD_CACHE/search``, else ``~/.cache/synthkd/search``: shared by searches of any budget."""
    root = os.environ.get("SYNTHKD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "synthkd"
    return Path(root) / "search"


def explore(
    teacher: Classifier, data: str | os.PathLike, settings: SearchSettings, seed: int = 0,
    accelerator: Accelerator | None = None, budget: Budget | None = None,
) -> Exploration:
    """Every candidate piece distilled (or read from the cache) with its local error and costs.
    A parameter or FLOPs ``budget`` that no student can meet fails before any training."""
    accelerator = accelerator or make_accelerator()
    space = candidate_space(settings.candidates, teacher)
    training_data = open_training_data(data, teacher, accelerator)
    exploration = Exploration(teacher, space, settings.pieces(seed), settings.pruned_epochs(), accelerator)
    if budget is not None and budget.kind in ("params", "flops"):
        least, teacher_cost = exploration.cost_lower_bound(budget.kind)
        limit = budget.limit(teacher_cost)
        if least > limit:
            raise no_student_fits(describe(budget.kind, limit),
                                  f"the cheapest piece of every neighbourhood together costs {describe(budget.kind, least)}")
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)  # a cache that cannot be made (e.g. HOME unwritable) stops before any work
    exploration.distill(training_data, data_fingerprint(data, training_data), cache_dir)
    return exploration


def finetune_merged(
    exploration: Exploration, student: Classifier, choice: tuple[int, ...], training_data: Dataset, finetune: TrainSettings,
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
    settings: SearchSettings,
    seed: int = 0,
    eval_dataset: str | None = None,
    accelerator: Accelerator | None = None,
) -> tuple[Classifier, dict[str, Any]]:
    """Search, merge, optionally fine-tune; save the student, ``metrics.json``, ``report.json``
    and ``frontier.png`` to ``out``. Every rank selects the same student from the costs the main
    process measured; the main process alone writes."""
    accelerator = accelerator or make_accelerator()
    budget = parse_budget(settings.budget)  # a bad budget fails before any training
    evaluation = load_dataset(eval_dataset) if eval_dataset else None
    started = time.perf_counter()
    exploration = explore(teacher, data, settings, seed, accelerator, budget)
    explore_seconds = time.perf_counter() - started
    limit = budget.limit(exploration.teacher_costs[budget.kind])
    frontier = exploration.frontier(budget.kind)
    chosen = select(frontier, limit, lambda value: describe(budget.kind, value))
    student = exploration.assemble(chosen.choice)
    report = search_report(exploration, student, budget, limit, frontier, chosen)
    report.update(explore_seconds=explore_seconds, num_processes=accelerator.num_processes)
    metrics: dict[str, Any] = {"mode": "search", "data": str(data), "budget": str(budget), "chosen_costs": report["chosen_costs"],
                               "explore_seconds": explore_seconds, "num_processes": accelerator.num_processes}
    if evaluation is not None:
        metrics["merged"] = evaluate(student, evaluation, accelerator)
    finetune = settings.finetune(seed)
    if finetune.epochs > 0:
        training_data = open_training_data(data, teacher, accelerator)
        metrics.update(finetune_merged(exploration, student, chosen.choice, training_data, finetune, accelerator, evaluation))
    student, metrics = finish(teacher, student, metrics, out, evaluation, eval_dataset, accelerator)
    for key in ("merged", "student", "teacher", "eval_dataset", "finetune_seconds"):
        if key in metrics:
            report[key] = metrics[key]
    if accelerator.is_main_process:
        atomic_write_json(Path(out) / "report.json", report)
        plot_frontier(Path(out) / "frontier.png", budget.kind, frontier, chosen, limit,
                      {name: (entry["costs"][budget.kind], entry["error"]) for name, entry in report["uniform"].items()})
    accelerator.wait_for_everyone()
    return student, report


def search_report(exploration: Exploration, student: Classifier, budget: Budget, limit: float, frontier: list[Solution],
                  chosen: Solution) -> dict[str, Any]:
    """What ``report.json`` says of a search: the choice, the frontier, the uniform students of the
    same pieces and every option with its error and costs."""
    device = exploration.accelerator.device
    # Whole-network latency, beside the summed latency of the pieces the budget is counted in.
    whole_latency = {name: measure_latency(model.net, exploration.activations[0], device)
                     for name, model in (("student", student), ("teacher", exploration.teacher))}
    options = [o for options in exploration.options for o in options]
    uniform = {name: {"costs": exploration.total_costs(choice),
                      "error": sum(exploration.options[k][i].relative_mse for k, i in enumerate(choice))}
               for name, choice in exploration.uniform_choices().items()}
    return {
        "budget": str(budget), "kind": budget.kind, "limit": limit, "teacher_costs": exploration.teacher_costs,
        "cuts": exploration.cuts, "candidates": [asdict(c) for c in exploration.space], "config": asdict(exploration.config),
        "sparsity_epochs": exploration.sparsity_epochs,
        "chosen": exploration.describe(chosen.choice), "chosen_costs": exploration.total_costs(chosen.choice),
        "choice": list(chosen.choice), "chosen_error": chosen.error, "whole_network_latency": whole_latency,
        "frontier": [{"cost": s.cost, "error": s.error, "candidates": [exploration.options[k][i].candidate.name for k, i in enumerate(s.choice)]}
                     for s in frontier],
        "uniform": uniform,
        "options": {exploration.names[k]: [{"candidate": o.candidate.name, "same_piece_as": o.candidates, "relative_mse": o.relative_mse,
                                            "costs": o.costs, "cached": o.resumed, "seconds": o.seconds, "rank": o.rank}
                                           for o in opts]
                    for k, opts in enumerate(exploration.options)},
        "trained": sum(not o.resumed for o in options), "cached": sum(o.resumed for o in options),
    }
