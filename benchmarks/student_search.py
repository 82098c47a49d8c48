"""Student Search against the uniform student on the standard Fashion-MNIST setting.

One run: every candidate piece of the space is distilled once (stage-level neighbourhoods, the
6,144 inverted images; by default students that keep the teacher's interfaces, ``inner=``), then
two searches with different budgets read them from the cache (their time is the cost of a search
once the candidates exist). Each budget is the cost of a uniform student (one candidate
everywhere, the teacher's depth); the searched student (cost within the budget) and that uniform
student (cost at or above it), both merged from the same distilled pieces and fine-tuned with the
same end-to-end KD epochs, are compared on the real test set, and so is end-to-end KD of the
uniform student (same parameters, same images, ``--e2e-epochs``).

    python benchmarks/student_search.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import replace
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, load_setting, print_table, standard_synthetic, standard_teacher, timed, write_json  # noqa: E402

from synthkd.accelerator import make_accelerator  # noqa: E402
from synthkd.data import load_dataset  # noqa: E402
from synthkd.evaluation import evaluate  # noqa: E402
from synthkd.models import load_model  # noqa: E402
from synthkd.pipelines.distill import DistillSettings, distill_e2e, open_training_data  # noqa: E402
from synthkd.search.explore import build_candidate  # noqa: E402
from synthkd.pipelines.search import SearchSettings, explore, finetune_merged, search  # noqa: E402

FULL = {"candidates": "inner=0.25,0.5,1.0;depth=1,3;sparsity=0.5", "epochs": 5, "finetune_epochs": 3, "e2e_epochs": 20,
        "budgets": [("params", "i0.5-d3"), ("flops", "i0.25-d3")]}
QUICK = {"candidates": "inner=0.25,0.5;depth=1,3;sparsity=0.5", "epochs": 1, "finetune_epochs": 1, "e2e_epochs": 3,
         "budgets": [("params", "i0.5-d3"), ("flops", "i0.25-d3")]}


def searched_vs_uniform(exploration, report: dict, uniform: dict, finetune, evaluation, training_data, accelerator,
                        rows: list[dict], finetune_epochs: int) -> dict[str, dict]:
    """The searched student and the uniform-width one (the teacher's depth) of the least cost at or
    above its cost, each merged and fine-tuned; a table row for each is added to ``rows``."""
    kind = report["kind"]
    cost = report["chosen_costs"][kind]
    baseline = min((name for name in uniform if name.endswith("-d3") and uniform[name][kind] >= cost),
                   key=lambda name: uniform[name][kind])
    entry = {}
    for label, choice in (("searched", tuple(report["choice"])), (f"uniform {baseline}", exploration.uniform_choices()[baseline])):
        student = exploration.assemble(choice)
        merged = evaluate(student, evaluation, accelerator)["accuracy"]
        tuned = finetune_merged(exploration, student, choice, training_data, finetune, accelerator)
        accuracy = evaluate(student, evaluation, accelerator)["accuracy"]
        costs = report["chosen_costs"] if label == "searched" else uniform[baseline]
        error = report["chosen_error"] if label == "searched" else report["uniform"][baseline]["error"]
        entry[label.split()[0]] = {"name": label, "accuracy": accuracy, "merged_accuracy": merged, "summed_local_error": error,
                                   "costs": costs, "finetune_seconds": tuned["finetune_seconds"]}
        rows.append({"budget": report["budget"], "student": label, "params": costs["params"], "MFLOPs": costs["flops"] / 1e6,
                     "summed error": error, "merged acc": merged, f"+{finetune_epochs} ep FT acc": accuracy})
    return entry


def uniform_e2e(teacher, exploration, uniform: dict, synthetic, out: Path, epochs: int, dist: dict, eval_spec: str,
                accelerator) -> dict:
    """End-to-end KD of the uniform student (its candidate network, same start as its pieces)."""
    name = uniform["name"].split()[-1]
    candidate = next(c for c in exploration.space if c.name == name)
    student = build_candidate(teacher, candidate, seed=0)
    started = time.perf_counter()
    _, metrics = distill_e2e(teacher, student, synthetic, out, DistillSettings(epochs=epochs, batch_size=dist["batch_size"]),
                             eval_dataset=eval_spec, accelerator=accelerator)
    return {"accuracy": metrics["student"]["accuracy"], "seconds": time.perf_counter() - started, "epochs": epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="settings file (default: configs/fashion_mnist.yaml)")
    parser.add_argument("--candidates", help="candidate space (default: %s)" % FULL["candidates"])
    parser.add_argument("--epochs", type=int, help="distillation epochs of every candidate piece")
    parser.add_argument("--finetune-epochs", type=int)
    parser.add_argument("--e2e-epochs", type=int, help="end-to-end KD epochs of the uniform student")
    parser.add_argument("--teacher", help="a model directory instead of the cached standard teacher")
    parser.add_argument("--data", help="a synthetic set directory instead of the cached inverted set")
    parser.add_argument("--cache", default=str(CACHE))
    parser.add_argument("--quick", action="store_true", help="the same measurement, smaller (minutes)")
    parser.add_argument("--out")
    args = parser.parse_args()
    config = load_setting(args.config)
    settings = dict(QUICK if args.quick else FULL)
    for key in ("candidates", "epochs", "finetune_epochs", "e2e_epochs"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    accelerator = make_accelerator()
    cache = Path(args.cache)
    timings: dict[str, float] = {}
    teacher = load_model(args.teacher) if args.teacher else standard_teacher(config, config["teacher"]["epochs"], cache, timings)
    synthetic = args.data or standard_synthetic(config, teacher, config["generate"]["num_images"], config["generate"]["iterations"],
                                                cache, timings)
    dist, eval_spec = config["distill"], config["eval_dataset"]
    candidates_dir, out = cache / "search-bench-candidates", cache / "search-bench-students"
    if accelerator.is_main_process:  # time training, not a resume of an earlier run
        for directory in (candidates_dir, out):
            shutil.rmtree(directory, ignore_errors=True)
    accelerator.wait_for_everyone()
    # The pieces keep the neighbourhood trainer's KD temperature and MixUp (4 and 1, the standard setting's).
    search_settings = SearchSettings(candidates=settings["candidates"], cuts="stages", epochs=settings["epochs"],
                                     batch_size=dist["batch_size"], cache_dir=str(candidates_dir))
    finetune = replace(search_settings, finetune_epochs=settings["finetune_epochs"]).finetune(seed=0)

    with timed(timings, "distill_all_candidates_seconds"):
        exploration = explore(teacher, synthetic, search_settings, accelerator=accelerator)
    uniform = {name: exploration.total_costs(choice) for name, choice in exploration.uniform_choices().items()}
    evaluation, training_data = load_dataset(eval_spec), open_training_data(synthetic, teacher, accelerator)
    rows, results = [], []
    for kind, reference in settings["budgets"]:
        budget = f"{kind}={uniform[reference][kind]:.0f}"
        started = time.perf_counter()
        _, report = search(teacher, synthetic, out / f"searched-{kind}", replace(search_settings, budget=budget),
                           accelerator=accelerator)
        entry = {"budget": budget, "kind": kind, "trained_in_search": report["trained"], "cached_in_search": report["cached"],
                 "search_seconds_from_cache": time.perf_counter() - started,
                 "chosen": [row["candidate"] for row in report["chosen"]]}
        entry.update(searched_vs_uniform(exploration, report, uniform, finetune, evaluation, training_data, accelerator, rows,
                                         settings["finetune_epochs"]))
        entry["accuracy_difference_points"] = 100 * (entry["searched"]["accuracy"] - entry["uniform"]["accuracy"])
        entry["e2e"] = uniform_e2e(teacher, exploration, entry["uniform"], synthetic, out / f"e2e-{kind}", settings["e2e_epochs"],
                                   dist, eval_spec, accelerator)
        rows.append({"budget": budget, "student": f"{entry['uniform']['name']}, e2e KD", "params": entry["uniform"]["costs"]["params"],
                     "MFLOPs": entry["uniform"]["costs"]["flops"] / 1e6, f"+{settings['finetune_epochs']} ep FT acc":
                     entry["e2e"]["accuracy"], "seconds": entry["e2e"]["seconds"]})
        results.append(entry)
    if accelerator.is_main_process:
        print_table(rows, f"{eval_spec} accuracy, {settings}")
        print(f"\ndistilling every candidate: {timings['distill_all_candidates_seconds']:.0f} s; each later search (cache hits): "
              + ", ".join(f"{r['search_seconds_from_cache']:.1f} s" for r in results))
        write_json(args.out, {"benchmark": "student_search", "quick": args.quick, "settings": settings,
                              "teacher_costs": exploration.teacher_costs, "num_processes": accelerator.num_processes,
                              "pieces": sum(len(o) for o in exploration.options), "uniform_costs": uniform,
                              "results": results, "timings": timings})


if __name__ == "__main__":
    main()
