"""The picture of a search: every non-dominated student of the space, the uniform students and the choice."""

from __future__ import annotations

import os
from typing import Sequence

from ..io import atomic_write
from .costs import describe
from .knapsack import Solution


def plot_frontier(path: str | os.PathLike, kind: str, frontier: Sequence[Solution], chosen: Solution, limit: float,
                  uniform: dict[str, tuple[float, float]]) -> None:
    """Summed local error against cost (``uniform``: name -> (cost, error) of one-candidate students)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, unit = {"params": (1e3, "thousand parameters"), "flops": (1e6, "MFLOPs"), "latency": (1e-3, "ms")}[kind]
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    axes.step([s.cost / scale for s in frontier], [s.error for s in frontier], where="post", marker=".",
              label=f"Pareto frontier ({len(frontier)} students)")
    for name, (cost, error) in uniform.items():
        axes.scatter(cost / scale, error, marker="x", color="grey")
        axes.annotate(name, (cost / scale, error), fontsize=7, color="grey", xytext=(3, 3), textcoords="offset points")
    axes.axvline(limit / scale, color="red", linestyle="--", label=f"budget {describe(kind, limit)}")
    axes.scatter(chosen.cost / scale, chosen.error, s=80, color="red", zorder=3, label="chosen")
    axes.set_xlabel(f"{kind} ({unit})")
    axes.set_ylabel("summed local error (relative MSE)")
    axes.set_yscale("log")
    axes.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)
