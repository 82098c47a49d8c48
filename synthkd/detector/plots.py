"""PNG plots of a detection evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from ..io import atomic_write  # noqa: E402


def _save(figure, path: Path) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(figure)


def plot_roc_curves(negatives: dict[str, torch.Tensor], failures: dict[str, dict[str, torch.Tensor]],
                    path: str | os.PathLike, title: str) -> None:
    """One ROC curve per scorer, for one failure source (``failures[scorer]``; positives = failures)."""
    figure, axes = plt.subplots(figsize=(5, 5))
    for scorer, failure_scores in failures.items():
        labels = np.r_[np.zeros(len(negatives[scorer])), np.ones(len(failure_scores))]
        detection = -torch.cat([negatives[scorer], failure_scores]).double().numpy()
        false_positive_rate, true_positive_rate, _ = roc_curve(labels, detection)
        axes.plot(false_positive_rate, true_positive_rate, label=scorer)
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="false positive rate (in-distribution flagged)", ylabel="true positive rate (failures flagged)",
             title=title, xlim=(0, 1), ylim=(0, 1))
    axes.legend(fontsize=8, loc="lower right")
    _save(figure, Path(path))


def plot_score_histograms(scores: dict[str, torch.Tensor], path: str | os.PathLike, title: str,
                          threshold: float | None = None) -> None:
    """Histograms of one scorer's scores, one per source."""
    figure, axes = plt.subplots(figsize=(7, 4))
    values = torch.cat(list(scores.values())).double().numpy()
    low, high = np.percentile(values, [0.5, 100])
    bins = np.linspace(low, high, 60)
    for source, source_scores in scores.items():
        axes.hist(source_scores.double().numpy().clip(low, high), bins=bins, density=True, histtype="step", label=source)
    if threshold is not None:
        axes.axvline(threshold, color="black", linestyle="--", linewidth=1, label="alpha threshold")
    axes.set(xlabel="score (higher = more typical)", ylabel="density", title=title)
    axes.legend(fontsize=8)
    _save(figure, Path(path))
