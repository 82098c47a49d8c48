"""Neighbourhood distillation (ND) against end-to-end KD of the same student on the same images.

The student keeps the teacher's interfaces (``resnet20:inner=0.5``: the teacher's width at every
cut, half the channels inside each block). Both methods run in one process, side by side:

* e2e KD from fresh weights (what plain KD does) and from the teacher's strongest channels (the
  start ND gets), each long enough to plateau, evaluated after every epoch;
* ND: the teacher's activations cached once, every neighbourhood trained on its (input, target)
  pairs, merged, then fine-tuned end to end, evaluated after the merge and every fine-tune epoch.

The figure of merit: wall time (cache building included, evaluation excluded) until ND reaches
e2e KD's final accuracy minus 0.5 points, against e2e's own time to plateau and to that same
target. ``--scaling`` reruns ND alone as 1 process x 1 thread, ``accelerate launch`` 2 processes
x 1 thread, and 1 process x 2 threads (subprocesses, one after the other). ``--sizes``: ND's
merged accuracy by neighbourhood size (blocks, stages, whole network) on the synthetic images and
on Gaussian noise (the first seed: small neighbourhoods are easier to learn from such inputs).

    python benchmarks/neighbourhood_vs_e2e.py --quick --scaling --sizes --out results.json
    python benchmarks/neighbourhood_vs_e2e.py --teacher-epochs 15 --scaling --sizes --out nd.json

``--quick`` is the same measurement on the digits setting (configs/digits_quick.yaml, minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, REPO, load_setting, print_table, standard_synthetic, standard_teacher, write_json  # noqa: E402

from synthkd.accelerator import make_accelerator  # noqa: E402
from synthkd.models import create_model, load_model  # noqa: E402
from synthkd.pipelines.distill import DistillSettings, StudentSettings, distill  # noqa: E402

TOLERANCE = 0.005  # ND's target: e2e KD's final accuracy minus 0.5 points
QUICK = {"config": REPO / "configs" / "digits_quick.yaml", "num_images": 512, "iterations": 50, "e2e_epochs": 30,
         "nd_epochs": 5, "finetune_epochs": 3, "views": 2, "noise_images": 512}


def parse_settings() -> tuple[argparse.Namespace, dict, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="settings file (default: configs/fashion_mnist.yaml; --quick: digits_quick.yaml)")
    parser.add_argument("--teacher-epochs", type=int, help="default: the config's")
    parser.add_argument("--teacher", help="a model directory instead of the cached standard teacher")
    parser.add_argument("--data", help="a synthetic set directory instead of the cached inverted set")
    parser.add_argument("--num-images", type=int)
    parser.add_argument("--e2e-epochs", type=int)
    parser.add_argument("--nd-epochs", type=int, help="epochs of every neighbourhood")
    parser.add_argument("--finetune-epochs", type=int)
    parser.add_argument("--views", type=int, help="cached views per image")
    parser.add_argument("--inner", type=float, default=0.5)
    parser.add_argument("--cuts", default="blocks")
    parser.add_argument("--part", choices=("all", "nd", "scaling"), default="all",
                        help="nd: ND alone (what --scaling runs); scaling: only the processes x threads table")
    parser.add_argument("--scaling", action="store_true", help="also ND at 1x1, 2x1 (accelerate launch) and 1x2 processes x threads")
    parser.add_argument("--sizes", action="store_true", help="also ND by neighbourhood size on synthetic images and noise")
    parser.add_argument("--cache", default=str(CACHE))
    parser.add_argument("--quick", action="store_true", help="the same measurement on digits (minutes)")
    parser.add_argument("--out")
    args = parser.parse_args()
    config = load_setting(args.config or (QUICK["config"] if args.quick else None))
    settings = {"teacher_epochs": config["teacher"]["epochs"], "num_images": config["generate"]["num_images"],
                "iterations": config["generate"]["iterations"], "e2e_epochs": config["distill"]["epochs"],
                "nd_epochs": 10, "finetune_epochs": 5, "views": 2, "noise_images": config["generate"]["num_images"]}
    if args.quick:
        settings.update({k: v for k, v in QUICK.items() if k != "config"})
    for key in ("teacher_epochs", "num_images", "e2e_epochs", "nd_epochs", "finetune_epochs", "views"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return args, config, settings


def time_to(history: list[dict[str, Any]], target: float, start_seconds: float = 0.0, start_accuracy: float = -1.0,
            clock: str = "seconds") -> float | None:
    """Training seconds (``clock``: wall ``seconds`` or ``cpu_seconds``; evaluation excluded) until
    the accuracy first reaches ``target``."""
    if start_accuracy >= target:
        return start_seconds
    seconds = start_seconds
    for record in history:
        seconds += record[clock]
        if record["eval_accuracy"] >= target:
            return seconds
    return None


def nd_curve(metrics: dict[str, Any]) -> tuple[dict[str, float], float, list[dict[str, Any]]]:
    """({clock: seconds to the merged student incl. the cache}, merged accuracy, fine-tune history)."""
    return ({"seconds": metrics["neighbourhood_seconds"], "cpu_seconds": metrics["neighbourhood_cpu_seconds"]},
            metrics["merged"]["accuracy"], metrics.get("finetune_history", []))


def run_nd(teacher, data: str, student: StudentSettings, dist: DistillSettings, settings: dict, out: Path, eval_spec: str,
           accelerator, cuts: str | None = None, finetune: bool = True) -> dict[str, Any]:
    if accelerator.is_main_process:
        shutil.rmtree(out, ignore_errors=True)  # time training, not a resume
    accelerator.wait_for_everyone()
    config = replace(dist, mode="neighbourhood", cuts=cuts or dist.cuts, epochs=settings["nd_epochs"], lr=None,
                     finetune_epochs=settings["finetune_epochs"] if finetune else 0, cache="memory",
                     cache_views=settings["views"])
    return distill(teacher, student, data, out, config, eval_dataset=eval_spec, accelerator=accelerator)[1]


def main() -> None:
    args, config, settings = parse_settings()
    if args.part == "scaling":
        rows = scaling(args, settings)
        print_table(rows, "ND to the merged student: processes x threads")
        write_json(args.out, {"benchmark": "neighbourhood_vs_e2e", "part": "scaling", "settings": settings, "scaling": rows})
        return
    accelerator = make_accelerator()
    cache = Path(args.cache)
    timings: dict[str, float] = {}
    if args.teacher:
        teacher = load_model(args.teacher)
    else:
        teacher = standard_teacher(config, settings["teacher_epochs"], cache, timings)
    if args.data:
        synthetic = args.data
    else:
        synthetic = str(standard_synthetic(config, teacher, settings["num_images"], settings["iterations"], cache, timings))
    teacher_arch, width = teacher.config.arch, teacher.config.arch_kwargs.get("width", 1.0)
    student = StudentSettings(arch=f"{teacher_arch}:inner={args.inner},width={width}")
    dist = replace(DistillSettings(**config["distill"]), cuts=args.cuts)
    eval_spec = config["eval_dataset"]
    channels = teacher.input_format.channels
    parameters = {name: sum(p.numel() for p in create_model(teacher_arch, in_channels=channels, **kwargs).parameters())
                  for name, kwargs in (("teacher", {"width": width}), (f"inner={args.inner}", {"width": width, "inner": args.inner}),
                                       ("half width", {"width": width / 2}))}
    scratch = cache / f"nb-bench-p{accelerator.num_processes}"
    report: dict[str, Any] = {"benchmark": "neighbourhood_vs_e2e", "quick": args.quick, "settings": settings,
                              "student": student.arch, "parameters": parameters, "num_processes": accelerator.num_processes}
    rows = []
    nd = run_nd(teacher, synthetic, student, dist, settings, scratch / "nd", eval_spec, accelerator)
    nd_seconds, merged, finetune_history = nd_curve(nd)
    report["nd"] = {"seconds_to_merged": nd_seconds["seconds"], "cpu_seconds_to_merged": nd_seconds["cpu_seconds"],
                    "merged_accuracy": merged, "final_accuracy": nd["student"]["accuracy"],
                    "cache": nd.get("activation_cache"), "finetune_history": finetune_history,
                    "local_errors": {k: v["relative_mse"] for k, v in nd["neighbourhoods"].items()},
                    "neighbourhood_train_seconds": {k: v["seconds"] for k, v in nd["neighbourhoods"].items()},
                    "assignment": nd["assignment"]}
    report["teacher_accuracy"] = nd["teacher"]["accuracy"]
    if args.part == "all":
        for init in ("random", "teacher"):
            if accelerator.is_main_process:
                shutil.rmtree(scratch / f"e2e-{init}", ignore_errors=True)  # time training, not a resume
            e2e = distill(teacher, student, synthetic, scratch / f"e2e-{init}",
                          replace(dist, mode="e2e", epochs=settings["e2e_epochs"], init=init), eval_dataset=eval_spec,
                          accelerator=accelerator)[1]
            history = e2e["history"]
            final = history[-1]["eval_accuracy"]
            target = final - TOLERANCE
            entry: dict[str, Any] = {"final_accuracy": final, "history": history}
            for clock in ("seconds", "cpu_seconds"):  # CPU seconds: fair between methods on a shared machine
                plateau = sum(r[clock] for r in history)
                own = time_to(history, target, clock=clock)
                nd_time = time_to(finetune_history, target, nd_seconds[clock], merged, clock=clock)
                entry[clock] = {"e2e_to_plateau": plateau, "e2e_to_target": own, "nd_to_target": nd_time,
                                "speedup_vs_plateau": plateau / nd_time if nd_time else None,
                                "speedup_vs_target": own / nd_time if nd_time else None}
                rows.append({"e2e start": init, "clock": clock.replace("_", " "), "e2e final": final, "e2e to plateau": plateau,
                             "e2e to final-0.5": own, "ND to final-0.5": nd_time if nd_time is not None else "not reached",
                             "ND best": max([merged] + [r["eval_accuracy"] for r in finetune_history]),
                             "speed-up vs plateau": plateau / nd_time if nd_time else "-",
                             "speed-up vs same target": own / nd_time if nd_time else "-"})
            report[f"e2e_{init}_init"] = entry
    if args.sizes and args.part == "all":
        sizes = []
        for name, data in (("synthetic", synthetic), ("gaussian noise", f"noise:gaussian:{settings['noise_images']}")):
            for cuts in ("blocks", "stages", "none"):
                result = run_nd(teacher, data, student, dist, settings, scratch / f"size-{cuts}", eval_spec, accelerator,
                                cuts=cuts, finetune=False)
                sizes.append({"inputs": name, "neighbourhoods": cuts, "pieces": len(result["neighbourhoods"]),
                              "merged accuracy": result["merged"]["accuracy"], "seconds": result["neighbourhood_seconds"],
                              "cpu seconds": result["neighbourhood_cpu_seconds"]})
        report["sizes"] = sizes
    if args.scaling and args.part == "all" and accelerator.is_main_process:
        report["scaling"] = scaling(args, settings)
    if accelerator.is_main_process:
        print(f"parameters: {parameters}")
        print(f"ND: merged {merged:.4f} after {nd_seconds['seconds']:.1f} s, {nd_seconds['cpu_seconds']:.1f} CPU s (cache "
              f"{nd.get('activation_cache', {}).get('seconds', 0):.1f} s), "
              f"final {nd['student']['accuracy']:.4f}; local errors "
              + ", ".join(f"{k} {v:.3f}" for k, v in report["nd"]["local_errors"].items()))
        print_table(rows, f"{eval_spec}: teacher {report['teacher_accuracy']:.4f}, student {student.arch}, {settings}")
        if "sizes" in report:
            print_table(report["sizes"], "ND merged accuracy by neighbourhood size (no fine-tune)")
        if "scaling" in report:
            print_table(report["scaling"], "ND to the merged student: processes x threads")
        write_json(args.out, {**report, "timings": timings})


def scaling(args: argparse.Namespace, settings: dict) -> list[dict[str, Any]]:
    """ND alone, one configuration after the other, each in fresh processes."""
    script = [str(Path(__file__).resolve()), "--part", "nd", "--cache", args.cache, "--cuts", args.cuts,
              "--inner", str(args.inner)] + (["--quick"] if args.quick else []) + (["--config", args.config] if args.config else [])
    for key in ("teacher_epochs", "num_images", "nd_epochs", "views"):
        script += [f"--{key.replace('_', '-')}", str(settings[key])]
    for key in ("teacher", "data"):
        if getattr(args, key):
            script += [f"--{key}", getattr(args, key)]
    script += ["--finetune-epochs", "0"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29617"]
    rows = []
    for processes, threads in ((1, 1), (2, 1), (1, 2)):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "nd.json"
            command = ([*launch] if processes > 1 else [sys.executable]) + script + ["--out", str(out)]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"ND at {processes}x{threads} failed:\n{done.stderr[-3000:]}")
            result = json.loads(out.read_text())
        nd = result["nd"]
        rows.append({"processes": processes, "threads": threads, "seconds to merged": nd["seconds_to_merged"],
                     "CPU s to merged (rank 0)": nd["cpu_seconds_to_merged"],
                     "cache seconds": (nd["cache"] or {}).get("seconds"), "merged accuracy": nd["merged_accuracy"],
                     "slowest rank's training s": max(sum(nd["neighbourhood_train_seconds"][n] for n in names)
                                                      for names in nd["assignment"].values())})
    base = rows[0]["seconds to merged"]
    for row in rows:
        row["speed-up"] = base / row["seconds to merged"]
    return rows


if __name__ == "__main__":
    main()
