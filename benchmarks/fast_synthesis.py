"""Fast synthesis on the standard setting: plain inversion vs the meta-learned generator vs
per-neighbourhood activations, each followed by the same fixed distillation budget.

For each method: the wall time to make its data, and the accuracy on the 10k real test images of
the resnet20 x0.5 student distilled on that data alone with ``--kd-steps`` optimiser steps
(batch 128; e2e KD for images, neighbourhood distillation for activations, which have no
image to fine-tune on). Plain inversion's per-batch time is measured in this run on
``--inversion-batches`` batches; its student is trained on the cached 6,144-image inverted set
(benchmarks/common.standard_synthetic, made in an earlier session), and its generation time is
that per-batch time times the number of batches of that set.

    python benchmarks/fast_synthesis.py [--quick] [--out benchmarks/results/fast_synthesis.json]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, load_setting, print_table, standard_synthetic, standard_teacher, write_json  # noqa: E402

import torch  # noqa: E402

from synthkd.accelerator import make_accelerator  # noqa: E402
from synthkd.data import load_dataset  # noqa: E402
from synthkd.evaluation import evaluate  # noqa: E402
from synthkd.generators.activations import ActivationConfig  # noqa: E402
from synthkd.generators.fast import FastConfig, FastGenerator  # noqa: E402
from synthkd.generators.inversion import ActivationInversion, InversionConfig  # noqa: E402
from synthkd.neighbourhood_training import NeighbourhoodConfig  # noqa: E402
from synthkd.pipelines.activations import generate_activations  # noqa: E402
from synthkd.pipelines.distill import build_student, distill_e2e, distill_neighbourhood  # noqa: E402
from synthkd.pipelines.generate import generate, shard_seed  # noqa: E402
from synthkd.training import TrainConfig  # noqa: E402

QUICK = {"inversion_batches": 1, "inversion_iterations": 10, "fast_images": 1024, "activation_images": 256,
         "activation_iterations": 10, "kd_steps": 60}
FULL = {"inversion_batches": 1, "inversion_iterations": 100, "fast_images": 8192, "activation_images": 1024,
        "activation_iterations": 30, "kd_steps": 800}
INVERTED_IMAGES = 6144  # the cached standard set (100 steps per batch of 256)


def epochs_for(kd_steps: int, images: int, batch_size: int) -> int:
    return max(1, round(kd_steps / max(1, images // batch_size)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value))
    parser.add_argument("--steps-per-batch", type=int, default=20)
    parser.add_argument("--cache", default=str(CACHE))
    parser.add_argument("--quick", action="store_true", help="the same measurement, smaller (minutes)")
    parser.add_argument("--out")
    args = parser.parse_args()
    settings = dict(QUICK if args.quick else FULL)
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
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
    rows, results = [], {}

    def distill_images(name: str, data: Path, images: int) -> float:
        train = TrainConfig(epochs=epochs_for(settings["kd_steps"], images, kd_batch), batch_size=kd_batch,
                            lr=config["distill"]["lr"])
        student = build_student(config["student"]["arch"], teacher, config["student"]["width"])
        started = time.perf_counter()
        distill_e2e(teacher, student, data, work / f"student-{name}", train, config["distill"]["temperature"],
                    mixup=config["distill"]["mixup"], accelerator=accelerator)
        results[name] = {"distill_seconds": time.perf_counter() - started, "distill_epochs": train.epochs}
        return evaluate(student, evaluation, accelerator)["accuracy"]

    # Plain inversion: per-batch time measured here; the student from the cached inverted set.
    inversion = ActivationInversion(teacher, InversionConfig(iterations=settings["inversion_iterations"],
                                                             lr=config["generate"]["lr"]))
    targets = torch.arange(batch) % teacher.num_classes
    started = time.perf_counter()
    for index in range(settings["inversion_batches"]):
        inversion.generate(targets, seed=shard_seed(0, index))
    per_batch = (time.perf_counter() - started) / settings["inversion_batches"]
    per_batch_100 = per_batch * 100 / settings["inversion_iterations"]  # the cached set's 100 steps per batch
    inverted = standard_synthetic(config, teacher, INVERTED_IMAGES, 100, cache, timings)
    inversion_generate = per_batch_100 * math.ceil(INVERTED_IMAGES / batch)
    accuracy = distill_images("inversion", inverted, INVERTED_IMAGES)
    results["inversion"].update({"images": INVERTED_IMAGES, "generate_seconds": inversion_generate,
                                 "seconds_per_batch_measured": per_batch, "iterations_measured": settings["inversion_iterations"],
                                 "accuracy": accuracy, "note": "cached set; generation time = measured per-batch time x batches"})

    # The fast generator: make its set (timed, warm-up included), then the same budget.
    fast_dir = work / "fast-set"
    generator = FastGenerator(teacher, FastConfig(steps_per_batch=args.steps_per_batch), seed=0)
    started = time.perf_counter()
    generate(teacher, generator, settings["fast_images"], fast_dir, batch, 0, accelerator)
    fast_generate = time.perf_counter() - started
    accuracy = distill_images("fast", fast_dir, settings["fast_images"])
    results["fast"].update({"images": settings["fast_images"], "generate_seconds": fast_generate, "accuracy": accuracy,
                            "generator": generator.config()})

    # Per-neighbourhood activations: make the sets, then neighbourhood distillation on them.
    activation_dir = work / "activation-set"
    started = time.perf_counter()
    generate_activations(teacher, ActivationConfig(iterations=settings["activation_iterations"]),
                         settings["activation_images"], activation_dir, batch, 0, accelerator)
    activation_generate = time.perf_counter() - started
    student = build_student(config["student"]["arch"], teacher, config["student"]["width"])
    neighbourhood = NeighbourhoodConfig(epochs=epochs_for(settings["kd_steps"], settings["activation_images"], kd_batch),
                                        batch_size=kd_batch, holdout=min(512, settings["activation_images"] // 5))
    started = time.perf_counter()
    _, metrics = distill_neighbourhood(teacher, student, activation_dir, work / "student-activations", neighbourhood,
                                       None, accelerator=accelerator, inputs="activations")
    results["activations"] = {
        "images": 0, "inputs_per_neighbourhood": settings["activation_images"], "generate_seconds": activation_generate,
        "distill_seconds": time.perf_counter() - started, "distill_epochs": neighbourhood.epochs,
        "accuracy": evaluate(student, evaluation, accelerator)["accuracy"],
        "relative_mse": {name: record["relative_mse"] for name, record in metrics["neighbourhoods"].items()},
    }

    for name, result in results.items():
        made = result["images"] or result["inputs_per_neighbourhood"]
        rows.append({"method": name, "made": made, "generate_s": result["generate_seconds"],
                     "per_minute": 60 * made / result["generate_seconds"], "distill_s": result["distill_seconds"],
                     "accuracy": result["accuracy"], "gap_points": 100 * (teacher_accuracy - result["accuracy"]),
                     "total_min": (result["generate_seconds"] + result["distill_seconds"]) / 60})
    print_table(rows, f"Fashion-MNIST, teacher {teacher_accuracy:.4f}, {settings['kd_steps']} distillation steps each")
    write_json(args.out, {
        "benchmark": "fast_synthesis", "quick": args.quick, "settings": settings, "steps_per_batch": args.steps_per_batch,
        "teacher_accuracy": teacher_accuracy, "rows": rows, "results": results,
        "generation_speedup_fast_vs_inversion_per_image": (results["inversion"]["generate_seconds"] / INVERTED_IMAGES)
        / (results["fast"]["generate_seconds"] / settings["fast_images"]),
    })


if __name__ == "__main__":
    main()
