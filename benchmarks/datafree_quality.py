"""Data-free quality: an ablation of the boundary techniques (generators/boundary.py) at a fixed
budget of generation + distillation, with per-class accuracy in every row, and the KD stage's
cost with and without ``--teacher-views``.

Every row is ``distill --synthesize fast`` (generators/fast.py, made while the student trains, so
the ``adversarial`` technique has its student) with the competition term off, the same number of
images and the same KD epochs; only ``--techniques`` differs: the baseline (none), each technique
alone, then the best combination, which is chosen on a **validation split of the training set**
(``--validation``, never the test set): every technique whose row beat the baseline there (mean
over ``--seeds``). The budget (``--budget-minutes`` per row, generation + distillation) is turned
into KD epochs once, from a probe of the baseline's cost per KD step and per generated batch
measured at the start, so every row does the same work; each row's own time is reported (a
costlier technique shows it there). Accuracy is on the real test split, overall and per class.

The KD-cost section distills the baseline's finished set twice with the same epochs: the teacher
labelling fresh views at every step (the default) and ``--teacher-views V`` (V views per image
labelled once), and gives the time ratio and both accuracies.

    python benchmarks/datafree_quality.py --quick --out runs/datafree_quality_quick.json      # < 5 min
    python benchmarks/datafree_quality.py --budget-minutes 30 --seeds 0,1,2 --out benchmarks/results/datafree_quality.json
    python benchmarks/datafree_quality.py --teacher runs/digits-teacher --validation digits:train --test digits:test \\
        --budget-minutes 1.5 --images 1024 --out benchmarks/results/datafree_quality_digits.json   # any model directory
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, load_setting, print_table, standard_teacher, write_json  # noqa: E402

import torch  # noqa: E402

from synthkd.accelerator import make_accelerator  # noqa: E402
from synthkd.data import SyntheticBatch, load_dataset  # noqa: E402
from synthkd.evaluation import evaluate  # noqa: E402
from synthkd.generators.boundary import TECHNIQUES, BoundarySettings  # noqa: E402
from synthkd.generators.fast import FastGenerator, FastSettings  # noqa: E402
from synthkd.generators.inversion import InversionLossSettings  # noqa: E402
from synthkd.models import load_model  # noqa: E402
from synthkd.pipelines.distill import DistillSettings, KDObjective, build_student, distill_e2e  # noqa: E402
from synthkd.pipelines.interleave import InterleaveSettings, distill_interleaved  # noqa: E402

QUICK = {"budget_minutes": 0.4, "images": 512, "gen_batch_size": 128, "validation": "fashion-mnist:train[:1000]",
         "test": "fashion-mnist:test[:2000]", "kd_views": 2}
FULL = {"budget_minutes": 30.0, "images": 12288, "gen_batch_size": 256, "validation": "fashion-mnist:train[50000:]",
        "test": None, "kd_views": 8}  # test None: the standard setting's eval_dataset
SINGLE = [name for name in TECHNIQUES]


def probe_costs(teacher, config: dict[str, Any], objective: InversionLossSettings, images: int, gen_batch: int,
                accelerator) -> dict[str, float]:
    """Seconds of one KD step (batch ``distill.batch_size``, teacher labelling its views) and of one
    adapted batch of the fast generator, measured here; what the budget is turned into epochs with."""
    kd_batch = config["distill"]["batch_size"]
    student = build_student(config["student"]["arch"], teacher, config["student"]["width"], seed=0).to(accelerator.device)
    kd = KDObjective(teacher, DistillSettings(mixup=config["distill"]["mixup"], flip=config["distill"]["flip"]))
    kd.to(accelerator.device)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    batch = SyntheticBatch(torch.rand(kd_batch, *teacher.input_format.shape, device=accelerator.device),
                           torch.zeros(kd_batch, teacher.num_classes), torch.zeros(kd_batch, dtype=torch.long))
    for step in range(12):
        if step == 2:
            started = time.perf_counter()
        loss = kd(student.train(), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    kd_step = (time.perf_counter() - started) / 10
    generator = FastGenerator(teacher, FastSettings(draws_per_adaptation=1), objective, seed=0)
    started = time.perf_counter()
    generator.generate(torch.arange(gen_batch) % teacher.num_classes, seed=0)
    adapt = time.perf_counter() - started
    draws = FastSettings().draws_per_adaptation
    return {"kd_step_seconds": kd_step, "adapt_seconds": adapt,
            "generate_seconds_estimate": adapt * images / gen_batch / draws}


def plan_epochs(budget_minutes: float, costs: dict[str, float], images: int, kd_batch: int) -> int:
    steps_per_epoch = max(1, images // kd_batch)
    left = budget_minutes * 60 - costs["generate_seconds_estimate"]
    return max(1, int(left / (steps_per_epoch * costs["kd_step_seconds"])))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, help="generation + distillation per row (default 30; quick 0.4)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (generation and KD) of every row")
    parser.add_argument("--images", type=int, help="synthetic images per row (default 12288; quick 512)")
    parser.add_argument("--gen-batch-size", type=int, help="images per generated batch (default 256; quick 128)")
    parser.add_argument("--epochs", type=int, help="KD epochs of every row (default: from the budget and the probe)")
    parser.add_argument("--rows", default=",".join(["baseline", *SINGLE, "best"]),
                        help="rows to run: baseline, technique names, best (the combination chosen on validation)")
    parser.add_argument("--best", help="the combination of the best row (comma-separated), instead of choosing it")
    parser.add_argument("--validation", help="real validation split the best row is chosen on (a training-set slice)")
    parser.add_argument("--test", help="real test split every row is scored on (default: the setting's eval_dataset)")
    parser.add_argument("--kd-views", type=int, help="--teacher-views of the KD-cost comparison (0: skip it)")
    parser.add_argument("--config", help="the setting (default configs/fashion_mnist.yaml): student, generation "
                                         "objective, KD settings and eval_dataset")
    parser.add_argument("--teacher", help="a model directory instead of the setting's teacher")
    parser.add_argument("--retrain-teacher", action="store_true", help="train the standard teacher instead of the shipped one")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--cache", default=str(CACHE))
    parser.add_argument("--quick", action="store_true", help="the same measurement, tiny (< 5 min)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    for key in settings:
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    rows_wanted = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows_wanted if r not in ("baseline", "best", *SINGLE)]
    if unknown:
        parser.error(f"unknown row {unknown[0]}; rows: baseline, {', '.join(SINGLE)}, best")
    best_given = [t for t in (args.best or "").split(",") if t]
    BoundarySettings(techniques=best_given).check()  # an unknown name is refused before anything runs

    config = load_setting(args.config)
    objective = InversionLossSettings(**{spec.name: config["generate"][spec.name] for spec in fields(InversionLossSettings)})
    accelerator = make_accelerator()
    cache = Path(args.cache)
    timings: dict[str, float] = {}
    teacher = (load_model(args.teacher) if args.teacher
               else standard_teacher(config, config["teacher"]["epochs"], cache, timings, retrain=args.retrain_teacher))
    teacher.to(accelerator.device)
    validation = load_dataset(settings["validation"])
    test_spec = settings["test"] or config["eval_dataset"]
    test = load_dataset(test_spec)
    teacher_val = evaluate(teacher, validation, accelerator)
    teacher_test = evaluate(teacher, test, accelerator)
    images, gen_batch, kd_batch = settings["images"], settings["gen_batch_size"], config["distill"]["batch_size"]
    costs = probe_costs(teacher, config, objective, images, gen_batch, accelerator)
    epochs = args.epochs or plan_epochs(settings["budget_minutes"], costs, images, kd_batch)
    print(f"probe: KD step {costs['kd_step_seconds']:.3f} s, adapted batch {costs['adapt_seconds']:.2f} s -> "
          f"{epochs} KD epochs of {images} images per row")
    work = cache / "datafree-quality"
    shutil.rmtree(work, ignore_errors=True)
    distill_settings = DistillSettings(epochs=epochs, batch_size=kd_batch, lr=config["distill"]["lr"],
                                       temperature=config["distill"]["temperature"], mixup=config["distill"]["mixup"],
                                       flip=config["distill"]["flip"])

    def run_row(name: str, techniques: list[str]) -> dict[str, Any]:
        runs = []
        for seed in seeds:
            directory = work / f"{name}-seed{seed}"
            synthesis = InterleaveSettings(synthesize="fast", num_images=images, gen_batch_size=gen_batch,
                                           batches_per_round=2, competition_weight=0.0, objective=objective,
                                           boundary=BoundarySettings(techniques=techniques))
            student = build_student(config["student"]["arch"], teacher, config["student"]["width"], seed)
            _, metrics = distill_interleaved(teacher, student, directory / "set", directory / "student", synthesis,
                                             distill_settings, seed, None, accelerator)
            diagnostic = metrics.get("diagnostic", {})
            runs.append({"seed": seed, "generate_seconds": metrics["generate_seconds"],
                         "distill_seconds": metrics["distill_seconds"], "total_seconds": metrics["total_seconds"],
                         "validation": evaluate(student, validation, accelerator)["accuracy"],
                         "test": evaluate(student, test, accelerator),
                         "collapsed": diagnostic.get("collapsed"), "near_boundary": diagnostic.get("near_boundary"),
                         "diagnostic": diagnostic})
        per_class = {c: mean([r["test"]["per_class"][c] for r in runs]) for c in runs[0]["test"]["per_class"]}
        row = {"row": name, "techniques": "+".join(techniques) or "-", "seeds": len(runs),
               "generate_s": mean([r["generate_seconds"] for r in runs]), "distill_s": mean([r["distill_seconds"] for r in runs]),
               "total_s": mean([r["total_seconds"] for r in runs]), "val_acc": mean([r["validation"] for r in runs]),
               "test_acc": mean([r["test"]["accuracy"] for r in runs]),
               "test_min": min(r["test"]["accuracy"] for r in runs), "test_max": max(r["test"]["accuracy"] for r in runs),
               "gap_points": 100 * (teacher_test["accuracy"] - mean([r["test"]["accuracy"] for r in runs])),
               "near_boundary": mean([r["near_boundary"] or 0 for r in runs]),
               "collapsed": sorted({c for r in runs for c in (r["collapsed"] or [])})}
        print_table([{k: v for k, v in row.items()}], f"row {name}")
        return {**row, "per_class": per_class, "runs": runs}

    results: list[dict[str, Any]] = []
    for name in rows_wanted:
        if name == "best":
            continue
        results.append(run_row(name, [] if name == "baseline" else [name]))
    best_techniques, best_reason = best_given, "given with --best"
    if "best" in rows_wanted and not best_given:
        baseline = next((r for r in results if r["row"] == "baseline"), None)
        singles = [r for r in results if r["row"] in SINGLE]
        if baseline is None or not singles:
            parser.error("choosing the best row needs the baseline and single-technique rows; or give --best")
        better = [r["row"] for r in singles if r["val_acc"] > baseline["val_acc"]]
        best_techniques = better or [max(singles, key=lambda r: r["val_acc"])["row"]]
        best_reason = ("every technique whose row beat the baseline on validation" if better
                       else "no technique beat the baseline on validation: the best single one")
    if "best" in rows_wanted:
        if len(best_techniques) == 1 and any(r["row"] == best_techniques[0] for r in results):
            best = dict(next(r for r in results if r["row"] == best_techniques[0]), row="best")
        else:
            best = run_row("best", best_techniques)
        best["chosen"] = best_reason
        results.append(best)

    kd_cost = None
    baseline_set = work / f"baseline-seed{seeds[0]}" / "set"
    if settings["kd_views"] and baseline_set.is_dir():
        measured = {}
        for label, views in (("teacher every step", 0), (f"{settings['kd_views']} views labelled once", settings["kd_views"])):
            variant = DistillSettings(**{**distill_settings.to_dict(), "teacher_views": views})
            student = build_student(config["student"]["arch"], teacher, config["student"]["width"], seeds[0])
            started = time.perf_counter()
            _, metrics = distill_e2e(teacher, student, baseline_set, work / f"kd-views-{views}", variant, seeds[0], None,
                                     accelerator)
            measured[label] = {"seconds": time.perf_counter() - started, "teacher_views_seconds": metrics.get("teacher_views_seconds"),
                               "validation": evaluate(student, validation, accelerator)["accuracy"],
                               "test": evaluate(student, test, accelerator)["accuracy"]}
        (plain, plain_run), (cached, cached_run) = measured.items()
        kd_cost = {"epochs": epochs, "images": images, "runs": measured,
                   "time_ratio": plain_run["seconds"] / cached_run["seconds"],
                   "test_difference_points": 100 * (cached_run["test"] - plain_run["test"])}
        print_table([{"kd": label, **{k: v for k, v in run.items() if v is not None}} for label, run in measured.items()],
                    f"KD cost, {epochs} epochs on the baseline's set: time ratio {kd_cost['time_ratio']:.2f}x")

    table = [{k: r[k] for k in ("row", "techniques", "seeds", "generate_s", "distill_s", "total_s", "val_acc", "test_acc",
                                "gap_points", "near_boundary")} | {"collapsed": ",".join(r["collapsed"]) or "-"} for r in results]
    title = (f"{'QUICK ' if args.quick else ''}ablation: teacher {teacher_test['accuracy']:.4f} on {test_spec} "
             f"({teacher_val['accuracy']:.4f} on {settings['validation']}); {images} images, {epochs} KD epochs per row, "
             + ("epochs given" if args.epochs else f"budget {settings['budget_minutes']} min"))
    print_table(table, title)
    names = list(teacher_test["per_class"])
    per_class = [{"row": "teacher", **{n[:8]: teacher_test["per_class"][n] for n in names}}]
    per_class += [{"row": r["row"], **{n[:8]: r["per_class"][n] for n in names}} for r in results]
    print_table(per_class, f"per-class test accuracy (mean over seeds {seeds})")
    write_json(args.out, {
        "benchmark": "datafree_quality", "quick": args.quick, "settings": settings, "seeds": seeds, "epochs": epochs,
        "probe": costs, "teacher": args.teacher or "standard", "teacher_validation": teacher_val, "teacher_test": teacher_test,
        "test": test_spec, "rows": table, "per_class": per_class, "results": results, "best": best_techniques,
        "kd_cost": kd_cost, "timings": timings, "command": " ".join(sys.argv),
    })


if __name__ == "__main__":
    main()
