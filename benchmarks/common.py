"""Shared pieces of the benchmark scripts: the standard setting, tables, JSON output."""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SYNTHKD_BENCH_CACHE", REPO / ".cache" / "benchmarks"))


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(k, "")) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print(f"\n{title}")
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_json(path: str | os.PathLike | None, data: dict[str, Any]) -> None:
    if path is None:
        return
    from synthkd.io import atomic_write_json

    atomic_write_json(path, {**data, "environment": environment(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"\nwrote {path}")


@contextmanager
def timed(record: dict[str, float], key: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    record[key] = time.perf_counter() - started
