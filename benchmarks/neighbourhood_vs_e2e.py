"""Neighbourhood distillation against end-to-end KD on the standard Fashion-MNIST setting.

Same teacher, same student architecture, same synthetic set and the same number of processes
for both methods, in one run: wall time of each to reach its final accuracy, the accuracies
and the speed-up. Also both methods on plain Gaussian-noise inputs (the seed's claim: small
neighbourhoods learn from such inputs better than the whole network). Run it under
``accelerate launch --num_processes N`` to compare at N processes.

    python benchmarks/neighbourhood_vs_e2e.py [--quick] [--out results.json]
    accelerate launch --multi_gpu --num_processes 2 benchmarks/neighbourhood_vs_e2e.py --out results-2p.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, load_setting, print_table, standard_synthetic, standard_teacher, timed, write_json  # noqa: E402

from synthkd.accelerator import make_accelerator  # noqa: E402
from synthkd.pipelines.distill import DistillSettings, StudentSettings, distill  # noqa: E402

QUICK = {"teacher_epochs": 1, "num_images": 512, "iterations": 20, "e2e_epochs": 4, "neighbourhood_epochs": 2,
         "finetune_epochs": 1, "noise_images": 512}


def parse_settings() -> tuple[argparse.Namespace, dict, dict]:
    """(arguments, the run schema's standard setting, this benchmark's sizes)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="settings file (default: configs/fashion_mnist.yaml)")
    parser.add_argument("--e2e-epochs", type=int)
    parser.add_argument("--neighbourhood-epochs", type=int, default=None)
    parser.add_argument("--finetune-epochs", type=int, default=None)
    parser.add_argument("--cuts", default="blocks")
    parser.add_argument("--noise-images", type=int, default=None)
    parser.add_argument("--no-noise", action="store_true", help="skip the Gaussian-noise comparison")
    parser.add_argument("--cache", default=str(CACHE))
    parser.add_argument("--quick", action="store_true", help="the same measurement, smaller (minutes)")
    parser.add_argument("--out")
    args = parser.parse_args()
    config = load_setting(args.config)
    settings = {
        "teacher_epochs": config["teacher"]["epochs"], "num_images": config["generate"]["num_images"],
        "iterations": config["generate"]["iterations"], "e2e_epochs": config["distill"]["epochs"],
        "neighbourhood_epochs": config["distill"]["epochs"] // 4, "finetune_epochs": config["distill"]["epochs"] // 10,
        "noise_images": config["generate"]["num_images"],
    }
    if args.quick:
        settings.update(QUICK)
    for key in ("e2e_epochs", "neighbourhood_epochs", "finetune_epochs", "noise_images"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return args, config, settings


def compare(teacher, data: str, tag: str, settings: dict, dist: DistillSettings, student: StudentSettings, cuts: str,
            eval_spec: str, cache: Path, timings: dict[str, float], accelerator) -> tuple[dict, dict]:
    """e2e KD and neighbourhood distillation (+ fine-tune) of the same student on ``data``: their metrics."""
    e2e_out, nb_out = cache / f"nb-bench-e2e-{tag}", cache / f"nb-bench-neighbourhood-{tag}"
    if accelerator.is_main_process:  # time training, not a resume of an earlier run
        for directory in (e2e_out, nb_out):
            shutil.rmtree(directory, ignore_errors=True)
    accelerator.wait_for_everyone()
    # Both modes from the standard setting's distill section: e2e at its lr, the neighbourhoods at
    # their own default (Adam, lr null).
    e2e_settings = replace(dist, mode="e2e", epochs=settings["e2e_epochs"])
    with timed(timings, f"e2e_{tag}_seconds"):
        _, e2e = distill(teacher, student, data, e2e_out, e2e_settings, eval_dataset=eval_spec, accelerator=accelerator)
    nb_settings = replace(dist, mode="neighbourhood", cuts=cuts, epochs=settings["neighbourhood_epochs"], lr=None,
                          finetune_epochs=settings["finetune_epochs"])
    with timed(timings, f"neighbourhood_{tag}_seconds"):
        _, nb = distill(teacher, student, data, nb_out, nb_settings, eval_dataset=eval_spec, accelerator=accelerator)
    return e2e, nb


def main() -> None:
    args, config, settings = parse_settings()
    accelerator = make_accelerator()
    cache = Path(args.cache)
    timings: dict[str, float] = {}
    teacher = standard_teacher(config, settings["teacher_epochs"], cache, timings)
    synthetic = standard_synthetic(config, teacher, settings["num_images"], settings["iterations"], cache, timings)
    dist = DistillSettings(**config["distill"])
    eval_spec = config["eval_dataset"]
    inputs = {"inverted": str(synthetic)}
    if not args.no_noise:
        inputs["gaussian noise"] = f"noise:gaussian:{settings['noise_images']}"
    rows, results = [], {}
    for name, data in inputs.items():
        tag = f"{name.replace(' ', '-')}-p{accelerator.num_processes}"
        e2e, nb = compare(teacher, data, tag, settings, dist, StudentSettings(**config["student"]), args.cuts, eval_spec, cache,
                          timings, accelerator)
        e2e_time, nb_time = timings[f"e2e_{tag}_seconds"], timings[f"neighbourhood_{tag}_seconds"]
        results[name] = {
            "e2e": {"accuracy": e2e["student"]["accuracy"], "seconds": e2e_time, "epochs": settings["e2e_epochs"]},
            "neighbourhood": {"accuracy": nb["student"]["accuracy"], "merged_accuracy": nb["merged"]["accuracy"],
                              "seconds": nb_time, "neighbourhood_seconds": nb["neighbourhood_seconds"],
                              "finetune_seconds": nb.get("finetune_seconds", 0.0),
                              "local_errors": {k: v["relative_mse"] for k, v in nb["neighbourhoods"].items()}},
            "speedup": e2e_time / nb_time,
            "accuracy_difference_points": 100 * (nb["student"]["accuracy"] - e2e["student"]["accuracy"]),
        }
        rows.append({"inputs": name, "method": "e2e KD", "accuracy": e2e["student"]["accuracy"], "seconds": e2e_time})
        rows.append({"inputs": name, "method": "neighbourhood (merged)", "accuracy": nb["merged"]["accuracy"],
                     "seconds": nb["neighbourhood_seconds"]})
        rows.append({"inputs": name, "method": f"neighbourhood + {settings['finetune_epochs']} ep fine-tune",
                     "accuracy": nb["student"]["accuracy"], "seconds": nb_time, "speedup": e2e_time / nb_time})
    if accelerator.is_main_process:
        print_table(rows, f"{eval_spec} accuracy, {accelerator.num_processes} process(es), {settings}")
        write_json(args.out, {"benchmark": "neighbourhood_vs_e2e", "quick": args.quick, "settings": settings,
                              "num_processes": accelerator.num_processes, "teacher_accuracy": e2e["teacher"]["accuracy"],
                              "results": results, "timings": timings})


if __name__ == "__main__":
    main()
