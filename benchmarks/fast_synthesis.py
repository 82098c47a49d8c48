"""Fast synthesis on the standard setting: accuracy against generation time for plain inversion and
the meta-learned generator, and per-neighbourhood activations, each with the same distillation budget.

Every student is resnet20 x0.5 distilled with ``--kd-steps`` optimiser steps (batch 128) on one
data set alone and scored on the 10k real test images. A method's curve has one point per data
size N: the student trained on the first N images of its set, and the time it took to make them.

- Plain inversion: the first N images of the cached 6,144-image inverted set
  (benchmarks/common.standard_synthetic, 100 steps per batch of 256, made by an earlier run);
  its generation time is N/256 batches x the per-batch time measured in this run (the cost of a
  step does not depend on the step, so ``--inversion-iterations`` steps are timed and scaled to 100).
- Fast: one set made here with the library's default fast generator (the options below override
  it), timed shard by shard, warm-up included; the time for N images is the time until its
  N-th image was written.
- Activations: one input set per neighbourhood, then neighbourhood distillation on it alone.

From the two curves: for every accuracy either method reached, the generation time each needs to
reach it (linear between a curve's points; only an upper bound where a curve's first point is
already above it; none if it never gets there), and their ratio.

    python benchmarks/fast_synthesis.py --skip-activations --out benchmarks/results/fast_synthesis_kd2400.json
    python benchmarks/fast_synthesis.py --quick --out runs/fast_synthesis_quick.json
    python benchmarks/fast_synthesis.py --kd-steps 800 --inversion-points 1024,2048,4096,6144 \
        --fast-points 2048,4096,6144,8192 --out benchmarks/results/fast_synthesis.json   # the earlier 800-step run
    python benchmarks/fast_synthesis.py --summary-of benchmarks/results/fast_synthesis.json   # tables only
    cd benchmarks/results && python ../fast_synthesis.py --summary-of fast_synthesis_kd2400.json \
        fast_synthesis_kd2400_seed1.json fast_synthesis_kd2400_seed1_more.json fast_synthesis_kd2400_seed2.json \
        fast_synthesis_kd2400_seed2_more.json --out fast_synthesis_kd2400_mean.json   # the comparison on mean curves
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, load_setting, print_table, standard_synthetic, standard_teacher, write_json  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

from synthkd.accelerator import make_accelerator  # noqa: E402
from synthkd.data import load_dataset  # noqa: E402
from synthkd.data.reader import SyntheticDataset  # noqa: E402
from synthkd.evaluation import evaluate  # noqa: E402
from synthkd.generators.activations import ActivationSynthesizer  # noqa: E402
from synthkd.generators.base import shard_seed  # noqa: E402
from synthkd.generators.fast import FastGenerator, FastSettings  # noqa: E402
from synthkd.generators.inversion import ActivationInversion, InversionSettings  # noqa: E402
from synthkd.io import atomic_write_json  # noqa: E402
from synthkd.neighbourhood_training import NeighbourhoodSettings  # noqa: E402
from synthkd.pipelines.activations import generate_activations  # noqa: E402
from synthkd.pipelines.distill import KDObjective, build_student, distill_neighbourhood  # noqa: E402
from synthkd.pipelines.generate import generate  # noqa: E402
from synthkd.training import KDSettings, TrainSettings, fit  # noqa: E402

QUICK = {"inversion_iterations": 10, "inversion_points": "512,1024", "fast_points": "512,1024",
         "activation_images": 256, "activation_iterations": 10, "kd_steps": 60}
# 2,400 KD steps: the standard recipe's budget (50 epochs of 6,144 images, batch 128)
FULL = {"inversion_iterations": 100, "inversion_points": "256,1024,6144", "fast_points": "2048,6144,12288",
        "activation_images": 1024, "activation_iterations": 30, "kd_steps": 2400}
INVERTED_IMAGES = 6144  # the cached standard set (100 steps per batch of 256)
GENERATOR_OPTIONS = [f for f in fields(FastSettings) if f.name in
                {"steps_per_batch", "warmup_batches", "meta_lr", "draws_per_adaptation", "latent_noise", "generator_channels"}]


def epochs_for(kd_steps: int, images: int, batch_size: int) -> int:
    return max(1, round(kd_steps / max(1, images // batch_size)))


def time_to_reach(curve: list[dict[str, float]], accuracy: float) -> tuple[float | None, bool]:
    """The generation time at which a curve (points with ``generate_seconds`` and ``accuracy``, by
    time) first reaches ``accuracy``, linear between its points, and whether that is exact: if its
    first point already reaches it, that point's time is only an upper bound; None if never."""
    previous = None
    for point in curve:
        seconds, reached = point["generate_seconds"], point["accuracy"]
        if reached >= accuracy:
            if previous is None:
                return seconds, False
            t0, a0 = previous
            return t0 + (accuracy - a0) / (reached - a0) * (seconds - t0), True
        previous = (seconds, reached)
    return None, True


def same_accuracy(curves: dict[str, list[dict[str, float]]]) -> list[dict[str, object]]:
    """For every accuracy one of the curves reached: the time each method needs to reach it, and
    inversion's time over the fast generator's."""
    levels = sorted({point["accuracy"] for curve in curves.values() for point in curve})
    table = []
    for accuracy in levels:
        (inversion, inversion_exact), (fast, fast_exact) = (time_to_reach(curves[m], accuracy) for m in ("inversion", "fast"))
        table.append({"accuracy": accuracy, "inversion_s": inversion, "inversion_exact": inversion_exact,
                      "fast_s": fast, "fast_exact": fast_exact,
                      "ratio": inversion / fast if inversion is not None and fast is not None else None})
    return table


def mean_curves(runs: list[dict[str, object]]) -> tuple[dict[str, list[dict[str, float]]], list[dict[str, object]]]:
    """The runs' curves pooled: per method and data size, the mean accuracy and generation time
    over the runs (KD seeds) that measured that point, and how many did; and a row per point."""
    pooled: dict[tuple[str, int], list[dict[str, float]]] = {}
    for run in runs:
        for method, curve in run["curves"].items():
            for point in curve:
                pooled.setdefault((method, point["images"]), []).append(point)
    curves: dict[str, list[dict[str, float]]] = {"inversion": [], "fast": []}
    rows = []
    for (method, images), points in sorted(pooled.items()):
        mean = {key: sum(p[key] for p in points) / len(points) for key in ("generate_seconds", "accuracy")}
        curves[method].append({"images": images, **mean})
        rows.append({"method": method, "images": images, "runs": len(points), "generate_s": mean["generate_seconds"],
                     "accuracy": mean["accuracy"], "min": min(p["accuracy"] for p in points),
                     "max": max(p["accuracy"] for p in points)})
    return curves, rows


def report(result: dict[str, object]) -> None:
    print_table(result["rows"], f"Fashion-MNIST, teacher {result['teacher_accuracy']:.4f}, "
                                f"{result['settings']['kd_steps']} distillation steps each")
    print_table(result["same_accuracy"], "generation time to reach each accuracy (exact False: at most this; "
                                         "ratio: inversion / fast)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value))
    for option in GENERATOR_OPTIONS:
        parser.add_argument(f"--{option.name.replace('_', '-')}", type=type(option.default),
                            help=f"fast generator (default {option.default})")
    parser.add_argument("--skip-activations", action="store_true", help="leave the activation method out")
    parser.add_argument("--seed", type=int, default=0,
                        help="every student's initial weights, batch order and augmentation (not the data sets)")
    parser.add_argument("--cache", default=str(CACHE))
    parser.add_argument("--quick", action="store_true", help="the same measurement, smaller (minutes)")
    parser.add_argument("--out")
    parser.add_argument("--summary-of", metavar="RUN.json", nargs="+",
                        help="measure nothing: print a saved run's tables with this comparison (and rewrite it to "
                             "--out); several runs (other --seed): the comparison on their mean curves")
    args = parser.parse_args()
    if args.summary_of and len(args.summary_of) > 1:
        runs = [json.loads(Path(path).read_text()) for path in args.summary_of]
        budgets = {run["settings"]["kd_steps"] for run in runs}
        if len(budgets) > 1:
            parser.error(f"--summary-of runs with different --kd-steps ({sorted(budgets)}) do not pool; give runs of one budget")
        curves, rows = mean_curves(runs)
        seeds = [run.get("seed", 0) for run in runs]  # runs from before --seed used seed 0
        result = {"benchmark": "fast_synthesis", "summary_of": args.summary_of, "kd_steps": budgets.pop(), "seeds": seeds,
                  "curves": curves, "rows": rows, "same_accuracy": same_accuracy(curves)}
        print_table(rows, f"mean over {len(runs)} runs (KD seeds {seeds}, {result['kd_steps']} KD steps) of each point they measured")
        print_table(result["same_accuracy"], "on the mean curves: generation time to reach each accuracy "
                                             "(exact False: at most this; ratio: inversion / fast)")
        write_json(args.out, result)
        return
    if args.summary_of:
        result = json.loads(Path(args.summary_of[0]).read_text())
        result["same_accuracy"] = same_accuracy(result["curves"])
        report(result)
        if args.out:
            atomic_write_json(args.out, result)
        return
    settings = dict(QUICK if args.quick else FULL)
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    # "" for either: that method's curve is not measured
    inversion_points, fast_points = ([int(n) for n in settings[key].split(",") if n] for key in ("inversion_points", "fast_points"))
    fast_config = FastSettings(**{o.name: getattr(args, o.name) for o in GENERATOR_OPTIONS if getattr(args, o.name) is not None})
    config = load_setting()
    cache = Path(args.cache)
    work = cache / "fast-synthesis"  # this benchmark's own outputs, cleared before timing
    shutil.rmtree(work, ignore_errors=True)
    timings: dict[str, float] = {}
    accelerator = make_accelerator()
    teacher = standard_teacher(config, config["teacher"]["epochs"], cache, timings)
    teacher.to(accelerator.device)
    batch = config["generate"]["batch_size"]
    kd_batch = config["distill"]["batch_size"]
    evaluation = load_dataset(config["eval_dataset"])
    teacher_accuracy = evaluate(teacher, evaluation, accelerator)["accuracy"]

    def distill_prefix(data: Path, images: int) -> dict[str, float]:
        """The student distilled on the first ``images`` images of ``data`` with the fixed budget."""
        train = TrainSettings(epochs=epochs_for(settings["kd_steps"], images, kd_batch), batch_size=kd_batch,
                            lr=config["distill"]["lr"], seed=args.seed)
        student = build_student(config["student"]["arch"], teacher, config["student"]["width"], seed=args.seed)
        objective = KDObjective(teacher, KDSettings(temperature=config["distill"]["temperature"], mixup=config["distill"]["mixup"]))
        started = time.perf_counter()
        fit(student, Subset(SyntheticDataset(data), range(images)), objective.to(accelerator.device), train,
            accelerator, description=f"distill ({images} images)")
        return {"distill_seconds": time.perf_counter() - started, "distill_epochs": train.epochs,
                "accuracy": evaluate(student, evaluation, accelerator)["accuracy"]}

    # Plain inversion: the per-batch time measured here, the students on the cached set's prefixes.
    inversion = ActivationInversion(teacher, InversionSettings(iterations=settings["inversion_iterations"],
                                                             lr=config["generate"]["lr"]))
    started = time.perf_counter()
    inversion.generate(torch.arange(batch) % teacher.num_classes, seed=shard_seed(0, 0))
    per_batch = (time.perf_counter() - started) * 100 / settings["inversion_iterations"]
    inverted = standard_synthetic(config, teacher, INVERTED_IMAGES, 100, cache, timings)
    curves: dict[str, list[dict[str, float]]] = {"inversion": [], "fast": []}
    for images in inversion_points:
        curves["inversion"].append({"images": images, "generate_seconds": per_batch * images / batch,
                                    **distill_prefix(inverted, images)})

    # The fast generator: one set, timed shard by shard, students on its prefixes.
    fast_dir = work / "fast-set"
    generator = FastGenerator(teacher, fast_config, seed=0)
    written: list[float] = []
    started = time.perf_counter()
    while fast_points and generate(teacher, generator, max(fast_points), fast_dir, batch, 0, accelerator,
                                   max_rounds=1) is None:
        written.append(time.perf_counter() - started)
    written.append(time.perf_counter() - started)
    for images in fast_points:
        curves["fast"].append({"images": images, "generate_seconds": written[-(-images // batch) - 1],
                               **distill_prefix(fast_dir, images)})

    # Per-neighbourhood activations: make the sets, then neighbourhood distillation on them.
    activations = None
    if not args.skip_activations:
        activation_dir = work / "activation-set"
        started = time.perf_counter()
        generate_activations(teacher, ActivationSynthesizer(teacher, iterations=settings["activation_iterations"]),
                             settings["activation_images"], activation_dir, batch, 0, accelerator)
        activation_generate = time.perf_counter() - started
        student = build_student(config["student"]["arch"], teacher, config["student"]["width"], seed=args.seed)
        neighbourhood = NeighbourhoodSettings(epochs=epochs_for(settings["kd_steps"], settings["activation_images"], kd_batch),
                                            batch_size=kd_batch, holdout=min(512, settings["activation_images"] // 5))
        started = time.perf_counter()
        _, metrics = distill_neighbourhood(teacher, student, activation_dir, work / "student-activations", neighbourhood,
                                           None, accelerator=accelerator, inputs="activations")
        activations = {
            "inputs_per_neighbourhood": settings["activation_images"], "generate_seconds": activation_generate,
            "distill_seconds": time.perf_counter() - started, "distill_epochs": neighbourhood.epochs,
            "accuracy": evaluate(student, evaluation, accelerator)["accuracy"],
            "relative_mse": {name: record["relative_mse"] for name, record in metrics["neighbourhoods"].items()},
        }

    rows = [{"method": method, "images": point["images"], "generate_s": point["generate_seconds"],
             "per_minute": 60 * point["images"] / point["generate_seconds"], "distill_s": point["distill_seconds"],
             "accuracy": point["accuracy"], "gap_points": 100 * (teacher_accuracy - point["accuracy"])}
            for method, curve in curves.items() for point in curve]
    if activations:
        rows.append({"method": "activations", "images": activations["inputs_per_neighbourhood"],
                     "generate_s": activations["generate_seconds"], "distill_s": activations["distill_seconds"],
                     "accuracy": activations["accuracy"], "gap_points": 100 * (teacher_accuracy - activations["accuracy"])})
    result = {
        "benchmark": "fast_synthesis", "quick": args.quick, "settings": settings, "seed": args.seed, "generator": generator.config(),
        "teacher_accuracy": teacher_accuracy, "inversion_seconds_per_batch": per_batch, "curves": curves,
        "same_accuracy": same_accuracy(curves), "activations": activations, "rows": rows,
    }
    report(result)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
