"""Cost of one activation-inversion step against the floor of a plain teacher pass.

The floor is a forward+backward of the teacher on the same batch with the gradient taken to
the input (what inversion must do at least); a forward+backward to the weights (a training
step without the optimiser) is shown beside it. Both are timed interleaved with the inversion
step in one run, so the ratios compare like with like on a noisy machine. Target: <= 1.15.

    python benchmarks/inversion_step.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

from synthkd.generators.inversion import ActivationInversion, InversionSettings  # noqa: E402
from synthkd.models import Classifier, InputFormat, ModelConfig  # noqa: E402


def make_teacher(arch: str, shape: tuple[int, int, int], device: torch.device) -> Classifier:
    config = ModelConfig(arch, InputFormat(*shape, mean=(0.5,), std=(0.25,)),
                         {"in_channels": shape[0], "num_classes": 10}, [str(i) for i in range(10)])
    teacher = Classifier.from_config(config).to(device).eval()
    return teacher.to(memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (same measurement)")
    parser.add_argument("--out")
    args = parser.parse_args()
    repeats = 8 if args.quick else args.repeats
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = (args.channels, args.size, args.size)
    teacher = make_teacher(args.arch, shape, device)
    generator = ActivationInversion(teacher, InversionSettings())
    targets = torch.arange(args.batch_size, device=device) % 10
    images = torch.rand(args.batch_size, *shape, device=device).contiguous(memory_format=torch.channels_last)
    images.requires_grad_(True)
    optimizer = torch.optim.Adam([images], lr=0.1, betas=(0.5, 0.9))
    with generator.objective.hooked():  # BN-statistics hooks for the inversion steps

        def inversion_step() -> None:
            generator.step(images, targets, optimizer)

        def input_floor() -> None:
            x = images.detach().requires_grad_(True)
            F.cross_entropy(teacher(x), targets).backward()
            x.grad.sum().item()

        weight_model = make_teacher(args.arch, shape, device).train().requires_grad_(True)
        fixed_images = images.detach()

        def weight_floor() -> None:
            weight_model.zero_grad(set_to_none=True)
            F.cross_entropy(weight_model(fixed_images), targets).backward()
            next(weight_model.parameters()).grad.sum().item()

        # The inversion teacher is frozen; the floor on the input needs no weight gradients either.
        teacher.requires_grad_(False)
        cases = {"inversion_step": inversion_step, "fwd_bwd_input": input_floor, "fwd_bwd_weights": weight_floor}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for fn in cases.values():  # warm-up
            fn()
            fn()
        for _ in range(repeats):
            for name, fn in cases.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = [
        {"case": name, "median_s": median[name], "ratio_to_input_floor": median[name] / median["fwd_bwd_input"],
         "ratio_to_weight_floor": median[name] / median["fwd_bwd_weights"]}
        for name in cases
    ]
    print_table(rows, f"{args.arch}, batch {args.batch_size}, {shape}, {device}, {repeats} repeats (median)")
    ratio = median["inversion_step"] / median["fwd_bwd_input"]
    print(f"\ninversion step / plain forward+backward (input gradient): {ratio:.3f}  (target <= 1.15)")
    write_json(args.out, {
        "benchmark": "inversion_step", "arch": args.arch, "batch_size": args.batch_size, "input_shape": shape,
        "device": str(device), "repeats": repeats, "median_seconds": median, "ratio": ratio,
        "ratio_to_weight_floor": median["inversion_step"] / median["fwd_bwd_weights"], "target": 1.15, "rows": rows,
    })


if __name__ == "__main__":
    main()
