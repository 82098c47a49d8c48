"""The headline: accuracy against wall time of generation + distillation, students born from the
teacher against fresh weights, on the standard setting (Fashion-MNIST, the standard resnet20 teacher).

Rows (``{arch}``/``{width}``: the teacher's architecture and width):
  (a) ``{arch}:width={width/2}`` from fresh weights (``--init random``);
  (b) the same student born from the teacher (the teacher pruned to its shapes);
  (c) ``teacher:params=0.25`` (the teacher pruned to a quarter of its parameters);
  (d) ``{arch}:width={width},inner=0.5`` born from the teacher (thinner inside each block).

The synthetic set is ``--data`` or made here with the fast generator (its time is charged to
every row). For each minute budget every row is one end-to-end KD run of its own (a cosine
schedule that ends at the budget): the epochs that fit are the budget less generation, the
student's birth and the run's fixed costs, over the row's seconds per epoch (both timed by a
one-epoch run first, not charged).
Test evaluations run outside the timed budget. How a born student is made (importance criterion,
BatchNorm recalibration) is chosen per row on a validation split of the training set
(``--validation``, by default the last 5k of fashion-mnist:train) after ``--choice-epochs`` of
KD, never on the test set. Every run records the torch threads and the load average before and
after it: a figure counts when ``alone`` (the load stayed within the threads this run uses).

    python benchmarks/headline.py --minutes 5,10,20,30 --out benchmarks/results/headline.json
    python benchmarks/headline.py --quick --teacher DIR --data SET --eval-dataset digits:test \
        --validation 'digits:train[-200:]' --out headline_quick.json     # seconds: a smoke test

``--summary-of ROW=DIR,...`` reads finished `synthkd distill --eval-dataset ...` runs instead (one
long schedule per row, its per-epoch test accuracy read off as a curve) and charges
``--generation-minutes`` to each: the figures of benchmarks/results/headline_runs.json.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, REPO, SHIPPED_TEACHER, load_setting, print_table, write_json  # noqa: E402

import torch  # noqa: E402

from synthkd.accelerator import make_accelerator  # noqa: E402
from synthkd.data import load_dataset  # noqa: E402
from synthkd.data.reader import is_synthetic_dir  # noqa: E402
from synthkd.evaluation import evaluate  # noqa: E402
from synthkd.models import Classifier, load_model  # noqa: E402
from synthkd.models.born import IMPORTANCES  # noqa: E402
from synthkd.pipelines.distill import (DistillSettings, StudentSettings, distill_e2e, open_training_data,  # noqa: E402
                                       sample_images, student_for)
from synthkd.pipelines.generate import GenerateSettings, generate_set  # noqa: E402

FULL = {"minutes": "5,10,20,30", "num_images": 12288, "choice_epochs": 2, "seeds": "0"}
QUICK = {"minutes": "0.1,0.2", "num_images": 256, "choice_epochs": 1, "seeds": "0"}


def rows_for(teacher: Classifier) -> list[dict[str, Any]]:
    """The four rows for this teacher, each with the birth options to choose among."""
    arch, width = teacher.config.arch, float(teacher.config.arch_kwargs.get("width", 1.0))
    birth = {"importance": list(IMPORTANCES), "recalibrate": [True, False]}
    half = f"{arch}:width={width / 2:g}"
    return [
        {"row": "a", "label": "fresh weights", "spec": half, "init": "random", "choices": {}},
        {"row": "b", "label": "born from the teacher", "spec": half, "init": "teacher", "choices": birth},
        {"row": "c", "label": "teacher at 25% params", "spec": "teacher:params=0.25", "init": "teacher", "choices": birth},
        {"row": "d", "label": "inner=0.5 born", "spec": f"{arch}:width={width:g},inner=0.5", "init": "teacher",
         "choices": {"recalibrate": [True, False]}},  # inner thinning keeps its own criterion (L1 x |BN scale|)
    ]


def with_options(spec: str, options: dict[str, Any]) -> str:
    extra = ",".join(f"{key}={str(value).lower()}" for key, value in options.items())
    return spec if not extra else f"{spec}{',' if ':' in spec else ':'}{extra}"


def recorded_path(path: str | os.PathLike, cache: Path) -> str:
    """``path`` as a result file records it: relative to the repository or the cache, not this machine."""
    resolved = Path(path).resolve()
    for root, prefix in ((cache.resolve(), Path("cache")), (REPO, Path("."))):
        if resolved.is_relative_to(root):
            return str(prefix / resolved.relative_to(root))
    return str(path)


def machine_load() -> float:
    return os.getloadavg()[0]


def born(teacher: Classifier, spec: str, init: str, images: torch.Tensor, seed: int) -> tuple[Classifier, float]:
    """The row's student as `synthkd distill` starts it, and the seconds that took (charged)."""
    started = time.perf_counter()
    student = student_for(StudentSettings(arch=spec), DistillSettings(init=init), teacher, seed,
                          images if init == "teacher" else None)
    return student, time.perf_counter() - started


def kd_run(teacher: Classifier, spec: str, init: str, data: str, images: torch.Tensor, epochs: int, kd: dict[str, Any],
           seed: int, out: Path, accelerator) -> tuple[Classifier, dict[str, Any]]:
    """Birth + end-to-end KD (timed together), with the machine's load around it."""
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resume
    load_before = machine_load()
    student, birth_seconds = born(teacher, spec, init, images, seed)
    student, metrics = distill_e2e(teacher, student, data, out, DistillSettings(epochs=epochs, init=init, **kd),
                                   seed, accelerator=accelerator)
    load_after = machine_load()
    threads = torch.get_num_threads()
    epoch_seconds = [epoch["seconds"] for epoch in metrics["history"]]
    return student, {"epochs": epochs, "birth_seconds": birth_seconds, "distill_seconds": metrics["distill_seconds"],
                     "epoch_seconds": sum(epoch_seconds) / len(epoch_seconds),
                     "fixed_seconds": metrics["distill_seconds"] - sum(epoch_seconds),
                     "seconds": birth_seconds + metrics["distill_seconds"], "threads": threads,
                     "load_before": load_before, "load_after": load_after,
                     "alone": max(load_before, load_after) <= threads + 0.5}


def choose_birth(row: dict[str, Any], teacher: Classifier, data: str, images: torch.Tensor, validation, epochs: int,
                 kd: dict[str, Any], out: Path, accelerator) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The birth options of the best validation accuracy after ``epochs`` of KD (and each one's
    accuracy at birth and after), on the validation split."""
    names = list(row["choices"])
    if not names:
        return {}, []
    trials = []
    for values in itertools.product(*(row["choices"][name] for name in names)):
        options = dict(zip(names, values))
        spec = with_options(row["spec"], options)
        student, _ = born(teacher, spec, row["init"], images, seed=0)
        at_birth = evaluate(student, validation, accelerator)["accuracy"]
        student, record = kd_run(teacher, spec, row["init"], data, images, epochs, kd, 0, out, accelerator)
        trials.append({"options": options, "validation_at_birth": at_birth,
                       "validation": evaluate(student, validation, accelerator)["accuracy"], "seconds": record["seconds"]})
    return max(trials, key=lambda trial: trial["validation"])["options"], trials


def summarize_runs(pairs: str, generation_seconds: float, minutes: list[float]) -> dict[str, Any]:
    """The curve of each finished distill run ``ROW=DIR``: test accuracy after the last epoch that
    fits each budget of generation + KD, in one-thread CPU minutes (robust to a busy machine) and
    wall minutes; the final per-class accuracy next to the teacher's."""
    from synthkd.io import read_json

    rows, curve = [], []
    for pair in pairs.split(","):
        row, _, directory = pair.partition("=")
        metrics = read_json(Path(directory) / "metrics.json")
        config = read_json(Path(directory) / "config.json")
        history = metrics["history"]
        cpu = [generation_seconds + used for used in itertools.accumulate(epoch["cpu_seconds"] for epoch in history)]
        wall = list(itertools.accumulate(epoch["seconds"] for epoch in history))
        points = {}
        for budget in minutes:
            fitting = [i for i, used in enumerate(cpu) if used <= 60 * budget]
            if fitting:
                points[f"{budget:g} min"] = history[fitting[-1]]["eval_accuracy"]
        teacher, student = metrics["teacher"], metrics["student"]
        parameters = sum(p.numel() for p in load_model(directory).parameters())
        rows.append({"row": row, "student": config["arch"], "arch_kwargs": config.get("arch_kwargs"), "epochs": len(history),
                     "cpu_minutes": cpu[-1] / 60, "kd_wall_minutes": wall[-1] / 60, "accuracy": student["accuracy"],
                     "gap_points": 100 * metrics["gap"], "curve": points, "per_class": student["per_class"],
                     "teacher_per_class": teacher["per_class"], "teacher_accuracy": teacher["accuracy"],
                     "parameters": parameters, "directory": recorded_path(directory, Path(CACHE))})
        curve.append({"row": row, **points, "final": student["accuracy"], "gap": 100 * metrics["gap"],
                      "cpu min": cpu[-1] / 60, "epochs": len(history)})
    print_table(curve, f"test accuracy after the last epoch within each budget (one-thread CPU minutes, generation "
                       f"{generation_seconds / 60:.1f} min charged)")
    print_table([{"class": name, "teacher": accuracy, **{r["row"]: r["per_class"][name] for r in rows}}
                 for name, accuracy in rows[0]["teacher_per_class"].items()], "per-class accuracy at the end")
    return {"benchmark": "headline (finished runs)", "generation_seconds": generation_seconds, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=str(SHIPPED_TEACHER), help="teacher model directory (default: %(default)s)")
    parser.add_argument("--data", help="a synthetic set directory (default: made here with the fast generator, timed)")
    parser.add_argument("--generation-minutes", type=float,
                        help="with --data or --summary-of: the minutes its generation took, charged to every row "
                             "(default 0)")
    parser.add_argument("--num-images", type=int, help=f"fast-generator images (default {FULL['num_images']})")
    parser.add_argument("--minutes", help=f"budgets of generation + birth + KD (default {FULL['minutes']})")
    parser.add_argument("--rows", default="a,b,c,d", help="which rows to run (default: %(default)s)")
    parser.add_argument("--seeds", help="KD seeds of every budget (default 0), e.g. 0,1,2")
    parser.add_argument("--choice-epochs", type=int, help="KD epochs of each birth option on the validation split")
    parser.add_argument("--validation", default="fashion-mnist:train[55000:]",
                        help="the split the birth options are chosen on, never the test set (default: %(default)s)")
    parser.add_argument("--eval-dataset", help="test set (default: the setting's eval_dataset)")
    parser.add_argument("--batch-size", type=int, help="KD batch size (default: the setting's)")
    parser.add_argument("--lr", type=float, help="KD learning rate (default: synthkd distill's)")
    parser.add_argument("--config", help="settings file (default: configs/fashion_mnist.yaml)")
    parser.add_argument("--cache", default=str(CACHE))
    parser.add_argument("--quick", action="store_true", help="the same measurement, tiny (seconds to minutes)")
    parser.add_argument("--summary-of", help="ROW=DIR,...: finished distill runs to read instead of running")
    parser.add_argument("--out")
    args = parser.parse_args()
    defaults = QUICK if args.quick else FULL
    if args.summary_of:
        budgets = [float(m) for m in (args.minutes or defaults["minutes"]).split(",")]
        write_json(args.out, summarize_runs(args.summary_of, 60 * (args.generation_minutes or 0.0), budgets))
        return
    config = load_setting(args.config)
    minutes = [float(m) for m in (args.minutes or defaults["minutes"]).split(",")]
    seeds = [int(s) for s in (args.seeds or defaults["seeds"]).split(",")]
    choice_epochs = args.choice_epochs or defaults["choice_epochs"]
    kd = {"batch_size": args.batch_size or config["distill"]["batch_size"], "lr": args.lr}
    eval_spec = args.eval_dataset or config["eval_dataset"]
    accelerator = make_accelerator()
    work = Path(args.cache) / "headline"
    teacher = load_model(args.teacher)

    generation_seconds = 60 * (args.generation_minutes or 0.0)
    data = args.data
    if data is None:
        data = str(work / f"fast-{teacher.fingerprint()}-n{args.num_images or defaults['num_images']}")
        if not is_synthetic_dir(data):
            shutil.rmtree(data, ignore_errors=True)
            started = time.perf_counter()
            generate_set(GenerateSettings(method="fast", num_images=args.num_images or defaults["num_images"]), teacher, data,
                         accelerator=accelerator)
            generation_seconds = time.perf_counter() - started
            (Path(data) / "generation_seconds.txt").write_text(f"{generation_seconds}\n")
        else:
            generation_seconds = float((Path(data) / "generation_seconds.txt").read_text())
    images = sample_images(open_training_data(data, teacher, accelerator))
    test, validation = load_dataset(eval_spec), load_dataset(args.validation)
    teacher_eval = evaluate(teacher, test, accelerator)

    results, table = [], []
    for row in (r for r in rows_for(teacher) if r["row"] in args.rows.split(",")):
        options, trials = choose_birth(row, teacher, data, images, validation, choice_epochs, kd, work / "choice", accelerator)
        spec = with_options(row["spec"], options)
        _, timing = kd_run(teacher, spec, row["init"], data, images, 1, kd, 0, work / "timing", accelerator)
        entry = {**row, "chosen": options, "trials": trials, "spec": spec, "seconds_per_epoch": timing["epoch_seconds"],
                 "budgets": []}
        for budget, seed in itertools.product(minutes, seeds):
            kd_seconds = 60 * budget - generation_seconds - timing["birth_seconds"] - timing["fixed_seconds"]
            epochs = max(1, math.floor(kd_seconds / timing["epoch_seconds"]))
            student, record = kd_run(teacher, spec, row["init"], data, images, epochs, kd, seed,
                                     work / f"{row['row']}-{budget:g}-{seed}", accelerator)
            scores = evaluate(student, test, accelerator)  # outside the timed budget
            record.update(minutes_budget=budget, seed=seed, minutes=(generation_seconds + record["seconds"]) / 60,
                          accuracy=scores["accuracy"], gap_points=100 * (teacher_eval["accuracy"] - scores["accuracy"]),
                          per_class=scores["per_class"], parameters=sum(p.numel() for p in student.parameters()))
            entry["budgets"].append(record)
            table.append({"row": f"({row['row']}) {row['label']}", "student": spec, "init": row["init"],
                          "params": record["parameters"], "budget min": budget, "min": record["minutes"], "seed": seed,
                          "epochs": epochs, "accuracy": record["accuracy"], "gap": record["gap_points"],
                          "alone": record["alone"]})
        results.append(entry)

    if accelerator.is_main_process:
        print_table(table, f"{eval_spec}: teacher {teacher_eval['accuracy']:.4f}; generation {generation_seconds / 60:.2f} min "
                           f"charged to every row; {torch.get_num_threads()} threads")
        last = {entry["row"]: entry["budgets"][-1] for entry in results if entry["budgets"]}
        print_table([{"class": name, "teacher": accuracy, **{f"({row}) at {record['minutes_budget']:g} min":
                                                             record["per_class"].get(name) for row, record in last.items()}}
                     for name, accuracy in teacher_eval["per_class"].items()], "per-class accuracy at the last budget")
        for entry in results:
            if entry["trials"]:
                print_table([{"options": trial["options"], "val at birth": trial["validation_at_birth"],
                              f"val after {choice_epochs} ep": trial["validation"]} for trial in entry["trials"]],
                            f"({entry['row']}) birth options on {args.validation}: chose {entry['chosen']}")
        write_json(args.out, {"benchmark": "headline", "quick": args.quick, "teacher": recorded_path(args.teacher, work),
                              "data": recorded_path(data, work),
                              "generation_seconds": generation_seconds, "eval_dataset": eval_spec,
                              "validation": args.validation, "choice_epochs": choice_epochs, "kd": kd,
                              "teacher_eval": teacher_eval, "results": results})


if __name__ == "__main__":
    main()
