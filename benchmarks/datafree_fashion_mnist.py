"""The project's standard benchmark: data-free distillation on Fashion-MNIST.

Teacher resnet20 trained on the real training images (cached), synthetic images from the
teacher alone (activation inversion), resnet20 at width 0.5 distilled end to end on them,
accuracy on the 10k real test images, and the time of each stage. With ``--real-reference``
the same student is also distilled with KD on the real training images (the reference for
"close to the teacher") in the same run.

    python benchmarks/datafree_fashion_mnist.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, load_setting, print_table, standard_synthetic, standard_teacher, timed, write_json  # noqa: E402

from synthkd.pipelines.distill import DistillSettings, build_student, distill_e2e  # noqa: E402

QUICK = {"teacher_epochs": 1, "num_images": 512, "iterations": 20, "distill_epochs": 5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="settings file (default: configs/fashion_mnist.yaml)")
    parser.add_argument("--teacher-epochs", type=int)
    parser.add_argument("--num-images", type=int)
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--distill-epochs", type=int)
    parser.add_argument("--real-reference", action="store_true", help="also distill on the real training images")
    parser.add_argument("--cache", default=str(CACHE), help="where the teacher and synthetic sets are kept")
    parser.add_argument("--quick", action="store_true", help="the same measurement, smaller (minutes)")
    parser.add_argument("--out")
    args = parser.parse_args()
    config = load_setting(args.config)
    settings = {
        "teacher_epochs": config["teacher"]["epochs"],
        "num_images": config["generate"]["num_images"],
        "iterations": config["generate"]["iterations"],
        "distill_epochs": config["distill"]["epochs"],
    }
    if args.quick:
        settings.update(QUICK)
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    cache = Path(args.cache)
    for stale in ("student-synthetic", "student-real"):  # time training, not a resume of an earlier run
        shutil.rmtree(cache / stale, ignore_errors=True)
    timings: dict[str, float] = {}
    eval_spec = config["eval_dataset"]

    teacher = standard_teacher(config, settings["teacher_epochs"], cache, timings)
    data_dir = standard_synthetic(config, teacher, settings["num_images"], settings["iterations"], cache, timings)

    dist = config["distill"]
    distill = DistillSettings(epochs=settings["distill_epochs"], batch_size=dist["batch_size"], lr=dist["lr"],
                              temperature=dist["temperature"], mixup=dist["mixup"])
    student = build_student(config["student"]["arch"], teacher, config["student"]["width"])
    with timed(timings, "distill_seconds"):
        _, metrics = distill_e2e(teacher, student, data_dir, cache / "student-synthetic", distill, eval_dataset=eval_spec)
    rows = [
        {"model": "teacher", "accuracy": metrics["teacher"]["accuracy"]},
        {"model": "student (synthetic only)", "accuracy": metrics["student"]["accuracy"],
         "gap_points": 100 * metrics["gap"]},
    ]
    result = {
        "benchmark": "datafree_fashion_mnist", "quick": args.quick, "settings": settings, "config": config,
        "teacher_accuracy": metrics["teacher"]["accuracy"], "student_accuracy": metrics["student"]["accuracy"],
        "gap_points": 100 * metrics["gap"], "timings": timings,
        "generate_plus_distill_minutes": (timings.get("generate_seconds", 0.0) + timings["distill_seconds"]) / 60,
        "per_class": {"teacher": metrics["teacher"]["per_class"], "student": metrics["student"]["per_class"]},
        "distill_history": metrics["history"],
    }
    if args.real_reference:
        reference = build_student(config["student"]["arch"], teacher, config["student"]["width"])
        reference_train = DistillSettings(epochs=2 if args.quick else config["reference_epochs"],
                                          batch_size=dist["batch_size"], lr=dist["lr"], temperature=dist["temperature"],
                                          mixup=0.0)
        with timed(timings, "real_reference_seconds"):
            _, real = distill_e2e(teacher, reference, config["teacher"]["dataset"], cache / "student-real", reference_train,
                                  eval_dataset=eval_spec)
        rows.append({"model": f"student (KD on real images, {reference_train.epochs} epochs)", "accuracy": real["student"]["accuracy"],
                     "gap_points": 100 * real["gap"]})
        result["real_reference_accuracy"] = real["student"]["accuracy"]
    print_table(rows, f"Fashion-MNIST test accuracy ({settings})")
    print_table([{"stage": k, "seconds": v} for k, v in timings.items()], "time per stage")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
