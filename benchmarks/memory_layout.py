"""Training-step time of the standard student in contiguous vs channels-last memory format on CPU.

One SGD step of `resnet20` at width 0.5 on a batch of Fashion-MNIST-sized images, timed
interleaved (contiguous, channels-last, contiguous, ...) at each thread count, so the ratio
compares like with like on a noisy machine. It decides the CPU layout (synthkd.accelerator.
training_memory_format): channels-last also runs the oneDNN AVX2 kernel whose 1x1 stride-2
weight gradient corrupts the heap at one thread (tests/test_native_layout.py).

    python benchmarks/memory_layout.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

from synthkd.models import create_model  # noqa: E402

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def step_seconds(layout: torch.memory_format, batch: torch.Tensor, labels: torch.Tensor) -> float:
    model = create_model("resnet20", in_channels=1, num_classes=10, width=0.5).to(memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inputs = batch.contiguous(memory_format=layout)
    for _ in range(2):  # warm-up: first calls pick kernels
        F.cross_entropy(model(inputs), labels).backward()
    started = time.perf_counter()
    for _ in range(5):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return (time.perf_counter() - started) / 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds per thread count")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (same measurement)")
    parser.add_argument("--out")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    torch.manual_seed(0)
    batch = torch.rand(args.batch_size, 1, 28, 28)
    labels = torch.randint(0, 10, (args.batch_size,))
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        for _ in range(rounds):
            for name, layout in LAYOUTS.items():
                times[name].append(step_seconds(layout, batch, labels))
        median = {name: statistics.median(values) for name, values in times.items()}
        rows.append({"threads": threads, "contiguous_ms": 1000 * median["contiguous"],
                     "channels_last_ms": 1000 * median["channels_last"],
                     "channels_last_speedup": median["contiguous"] / median["channels_last"]})
    print_table(rows, f"SGD step, resnet20 x0.5, batch {args.batch_size} of 1x28x28 (median of {rounds} interleaved rounds)")
    write_json(args.out, {"rows": rows, "rounds": rounds, "batch_size": args.batch_size,
                          "load_average_at_end": os.getloadavg()})


if __name__ == "__main__":
    main()
