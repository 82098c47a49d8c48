"""Diffusion samples vs inverted images as the synthetic set, standard Fashion-MNIST setting.

The same half-width resnet20 student is distilled end to end (same budget) on N images from
each generator, and scored on the 10k real test images; each generator's images per second
are measured in this run. The diffusion model is a small DDPM trained here on the real
Fashion-MNIST training images (cached under the benchmark cache): that is a different premise
from data-free distillation, where no real image is seen; the comparison says what a
diffusion model of the data would buy, not what the teacher alone can give. The inverted set
is the cached standard one; inversion speed is measured on one batch here and the time of the
full set extrapolated from it.

    python benchmarks/diffusion_vs_inversion.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, load_setting, print_table, standard_synthetic, standard_teacher, timed, write_json  # noqa: E402

from synthkd.accelerator import make_accelerator  # noqa: E402
from synthkd.generators.diffusion import DiffusionGenerator, DiffusionSettings  # noqa: E402
from synthkd.generators.inversion import ActivationInversion, InversionSettings  # noqa: E402
from synthkd.pipelines.distill import DistillSettings, build_student, distill_e2e  # noqa: E402
from synthkd.pipelines.generate import SelectionSettings, generate  # noqa: E402
from synthkd.pipelines.train_diffusion import DiffusionTrainSettings, train_diffusion  # noqa: E402

# Sized for an 18-minute budget on 2 CPU cores: 15 KD epochs where the setting says 50, and at
# most 4 draws per shard for the class balance.
FULL = {"ddpm_steps": 450, "num_images": 6144, "sampling_steps": 10, "max_tries": 4, "distill_epochs": 15,
        "inversion_batch": 256}
QUICK = {"ddpm_steps": 60, "num_images": 512, "sampling_steps": 5, "max_tries": 4, "distill_epochs": 3,
         "inversion_batch": 64, "iterations": 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ddpm-steps", type=int, help="optimiser steps of the DDPM (batch 128)")
    parser.add_argument("--num-images", type=int, help="images in each synthetic set")
    parser.add_argument("--sampling-steps", type=int, help="DDIM steps per sample")
    parser.add_argument("--distill-epochs", type=int, help="e2e KD epochs on each set (the setting says 50)")
    parser.add_argument("--max-tries", type=int, help="draws per shard for --min-confidence and the class balance")
    parser.add_argument("--min-confidence", type=float, default=0.0)
    parser.add_argument("--no-balance", action="store_true", help="keep the DDPM's own class mix")
    parser.add_argument("--cache", default=str(CACHE))
    parser.add_argument("--quick", action="store_true", help="the same measurement, smaller (minutes)")
    parser.add_argument("--out")
    args = parser.parse_args()
    config = load_setting()
    settings = {**FULL, "iterations": config["generate"]["iterations"]}
    if args.quick:
        settings.update(QUICK)
    for key in ("ddpm_steps", "num_images", "sampling_steps", "max_tries", "distill_epochs"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    cache = Path(args.cache)
    accelerator = make_accelerator()
    timings: dict[str, float] = {}
    teacher = standard_teacher(config, config["teacher"]["epochs"], cache, timings)

    # The DDPM (trained once, kept in the cache).
    ddpm_config = DiffusionTrainSettings(max_steps=settings["ddpm_steps"], batch_size=128)
    widths = "-".join(map(str, ddpm_config.block_out_channels))
    ddpm_dir = cache / f"diffusion-ddpm-{config['teacher']['dataset'].replace(':', '-')}-s{settings['ddpm_steps']}-w{widths}"
    ddpm_cached = (ddpm_dir / "metrics.json").is_file()
    with timed(timings, "ddpm_cached_seconds" if ddpm_cached else "ddpm_train_seconds"):
        ddpm = train_diffusion(config["teacher"]["dataset"], ddpm_dir, ddpm_config, accelerator)

    # The diffusion set, made afresh and timed.
    n = settings["num_images"]
    diffusion_dir = cache / f"diffusion-set-{'quick' if args.quick else 'full'}"
    shutil.rmtree(diffusion_dir, ignore_errors=True)
    selection = SelectionSettings(min_confidence=args.min_confidence, balance=not args.no_balance,
                          max_tries=settings["max_tries"])
    batch = config["generate"]["batch_size"]
    with timed(timings, "diffusion_generate_seconds"):
        sampler = DiffusionGenerator(DiffusionSettings(str(ddpm_dir), steps=settings["sampling_steps"], scheduler="ddim",
                                                     sample_batch_size=batch),
                                     teacher.input_format, teacher.config.class_names, accelerator.device)
        manifest = generate(teacher, sampler, n, diffusion_dir, batch, accelerator=accelerator, selection=selection)

    # The inverted set (cached), and inversion speed measured on one batch.
    inversion_dir = standard_synthetic(config, teacher, n, settings["iterations"], cache, timings)
    inversion = ActivationInversion(teacher.to(accelerator.device),
                                    InversionSettings(iterations=settings["iterations"], lr=config["generate"]["lr"]))
    targets = torch.arange(settings["inversion_batch"]) % teacher.num_classes
    with timed(timings, "inversion_one_batch_seconds"):
        inversion.generate(targets, seed=12345)
    inversion_rate = settings["inversion_batch"] / timings["inversion_one_batch_seconds"]

    # The same student and budget on each set.
    dist = config["distill"]
    distill = DistillSettings(epochs=settings["distill_epochs"], batch_size=dist["batch_size"], lr=dist["lr"],
                              temperature=dist["temperature"], mixup=dist["mixup"])
    students = {}
    for name, data in (("diffusion", diffusion_dir), ("inversion", inversion_dir)):
        out = cache / f"diffusion-student-{name}"
        shutil.rmtree(out, ignore_errors=True)  # time training, not a resume of an earlier run
        student = build_student(config["student"]["arch"], teacher, config["student"]["width"])
        with timed(timings, f"distill_{name}_seconds"):
            _, students[name] = distill_e2e(teacher, student, data, out, distill, eval_dataset=config["eval_dataset"],
                                            accelerator=accelerator)

    report = manifest["report"] if "report" in manifest else None
    diffusion_rate = n / timings["diffusion_generate_seconds"]
    drawn = sum(report["drawn"]) if report else n
    rows = [
        {"generator": f"DDPM ({ddpm['parameters'] / 1e6:.2f}M, {ddpm['steps']} training steps), DDIM {settings['sampling_steps']} steps"
                      + (", balanced" if selection.balance else ""),
         "images_per_second": diffusion_rate, "student_accuracy": students["diffusion"]["student"]["accuracy"]},
        {"generator": f"inversion ({settings['iterations']} Adam steps per batch)",
         "images_per_second": inversion_rate, "student_accuracy": students["inversion"]["student"]["accuracy"]},
    ]
    print_table(rows, f"{n} images each, student resnet20 x0.5, {distill.epochs} KD epochs, "
                      f"{config['eval_dataset']} (teacher {students['inversion']['teacher']['accuracy']:.4f})")
    print_table([{"stage": k, "seconds": v} for k, v in timings.items()], "time per stage")
    result = {
        "benchmark": "diffusion_vs_inversion", "quick": args.quick, "settings": settings, "config": config,
        "premise": "the DDPM is trained on the real Fashion-MNIST training images: not data-free",
        "teacher_accuracy": students["inversion"]["teacher"]["accuracy"],
        "student_accuracy": {name: metrics["student"]["accuracy"] for name, metrics in students.items()},
        "images_per_second": {"diffusion": diffusion_rate, "diffusion_draws": drawn / timings["diffusion_generate_seconds"],
                              "inversion": inversion_rate},
        "inversion_full_set_seconds_extrapolated": n / inversion_rate,
        "diffusion_full_set_seconds": timings["diffusion_generate_seconds"],
        "ddpm": {key: ddpm[key] for key in ("config", "parameters", "steps", "train_seconds", "history")},
        "ddpm_trained_in_this_run": not ddpm_cached,
        "selection": {"settings": vars(selection), "report": report, "class_names": teacher.config.class_names},
        "timings": timings,
        "per_class": {name: metrics["student"]["per_class"] for name, metrics in students.items()},
        "distill_history": {name: metrics["history"] for name, metrics in students.items()},
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
