"""A per-class diagnostic of a synthetic set that needs no real data: what a user should see
before distilling on it.

Per class (the class each image was aimed at): how confidently the teacher names it, how often a
given student agrees with the teacher, and how varied its images are in the teacher's feature
space (mean distance of each image's unit-length penultimate feature to its nearest neighbour of
the same class); and per pair of classes, how many images lie near their boundary (the teacher's
two most likely classes are that pair and the gap between their probabilities is below
``margin``). A class whose diversity is a small fraction of the typical class's is flagged as
collapsed (its images are near copies: the student learns one point of it), and one the teacher
rarely names as aimed is flagged off target.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from synthkd.detector.features import default_layer
from synthkd.errors import SynthkdError, one_line, warn
from synthkd.io import atomic_write_json, read_json
from synthkd.models import Classifier

DIAGNOSTIC_NAME = "diagnostic.json"
MARGIN = 0.5  # top-1 minus top-2 teacher probability below which an image is near a boundary
COLLAPSE_RATIO = 0.2  # diversity below this fraction of the median class's: collapsed
OFF_TARGET = 0.5  # the teacher names the aimed class for less than this share: off target
PER_CLASS = 1000  # images per class the nearest-neighbour distances are measured on (a strided subset)


@torch.no_grad()
def teacher_features(teacher: Classifier, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, logits) of ``images`` under ``teacher``, batch by batch."""
    device = next(teacher.parameters()).device
    linear = dict(teacher.net.named_modules())[default_layer(teacher)]
    captured: list[torch.Tensor] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor]) -> None:
        captured.append(inputs[0].flatten(1).float().cpu())

    handle = linear.register_forward_pre_hook(record)
    logits = []
    try:
        teacher.eval()
        for start in range(0, len(images), batch_size):
            logits.append(teacher(images[start:start + batch_size].to(device)).float().cpu())
    finally:
        handle.remove()
    return torch.cat(captured), torch.cat(logits)


@torch.no_grad()
def predictions(model: Classifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    device = next(model.parameters()).device
    model.eval()
    return torch.cat([model(images[s:s + batch_size].to(device)).argmax(1).cpu() for s in range(0, len(images), batch_size)])


def nearest_neighbour_distance(features: torch.Tensor) -> float:
    """Mean distance of each unit-length feature to its nearest other one (0 for fewer than two)."""
    if len(features) < 2:
        return 0.0
    unit = F.normalize(features.float(), dim=1)
    distances = torch.cdist(unit, unit)
    distances.fill_diagonal_(float("inf"))
    return float(distances.min(1).values.mean())


def diagnose(teacher: Classifier, images: torch.Tensor, targets: torch.Tensor, student: Classifier | None = None,
             margin: float = MARGIN) -> dict[str, Any]:
    """The diagnostic of a set of ``images`` aimed at ``targets`` (see the module's docstring)."""
    names = list(teacher.config.class_names) or [str(i) for i in range(teacher.num_classes)]
    features, logits = teacher_features(teacher, images)
    probabilities = logits.softmax(1)
    top = probabilities.topk(2, dim=1)
    labels = top.indices[:, 0]
    agree = (predictions(student, images) == labels) if student is not None else None
    classes = []
    for index, name in enumerate(names):
        members = torch.nonzero(targets == index).flatten()
        record: dict[str, Any] = {"class": name, "count": len(members)}
        if len(members):
            stride = max(1, len(members) // PER_CLASS)
            record.update(
                teacher_confidence=float(probabilities[members, index].mean()),
                on_target=float((labels[members] == index).float().mean()),
                diversity=nearest_neighbour_distance(features[members[::stride][:PER_CLASS]]),
            )
            if agree is not None:
                record["agreement"] = float(agree[members].float().mean())
        classes.append(record)
    flag_classes(classes)
    near = torch.nonzero(top.values[:, 0] - top.values[:, 1] < margin).flatten()
    pairs: dict[tuple[int, int], int] = {}
    for first, second in top.indices[near].tolist():
        key = (min(first, second), max(first, second))
        pairs[key] = pairs.get(key, 0) + 1
    boundary = [{"pair": [names[a], names[b]], "count": count}
                for (a, b), count in sorted(pairs.items(), key=lambda item: (-item[1], item[0]))]
    return {
        "num_images": len(images), "margin": margin, "near_boundary": len(near), "boundary_pairs": boundary,
        "classes": classes, "collapsed": [c["class"] for c in classes if "collapsed" in c["flags"]],
        "off_target": [c["class"] for c in classes if "off target" in c["flags"]],
        "student": student is not None,
    }


def flag_classes(classes: list[dict[str, Any]]) -> None:
    """Add ``flags`` to every class record: collapsed (diversity under COLLAPSE_RATIO of the median
    class's, or fewer than two images), off target (the teacher names it for under OFF_TARGET)."""
    diversities = sorted(c["diversity"] for c in classes if "diversity" in c)
    median = diversities[len(diversities) // 2] if diversities else 0.0
    for record in classes:
        flags = []
        if record["count"] < 2 or record.get("diversity", 0.0) < COLLAPSE_RATIO * median:
            flags.append("collapsed")
        if record.get("on_target", 0.0) < OFF_TARGET:
            flags.append("off target")
        record["flags"] = flags


def diagnose_set(directory: str | os.PathLike, teacher: Classifier, student: Classifier | None = None,
                 write: bool = True) -> dict[str, Any]:
    """The diagnostic of the finished synthetic set in ``directory``, written beside its manifest;
    the one already there when it was made of the same shards with the same teacher and student
    (so generating a finished set again rewrites nothing)."""
    from synthkd.data.reader import SyntheticDataset

    data = SyntheticDataset(directory, verify=False)
    for name, model in (("the teacher", teacher), ("the student", student)):
        if model is not None and model.num_classes != data.num_classes:
            raise SynthkdError(f"{directory} has {data.num_classes} classes but {name} predicts {model.num_classes}; "
                               "inspect a set with the teacher that made it and a student of its classes")
    made_of = {"shards": [shard["sha256"] for shard in data.manifest["shards"]], "teacher": teacher.fingerprint(),
               "student": student.fingerprint() if student is not None else None}
    existing = read_diagnostic(directory)
    if existing is not None and existing.get("made_of") == made_of:
        return existing
    diagnostic = {**diagnose(teacher, data.images, data.targets, student), "made_of": made_of}
    if write:
        try:
            write_diagnostic(directory, diagnostic)
        except OSError as error:  # a read-only set: the diagnostic is still shown
            warn(f"the diagnostic is not saved in {directory} ({one_line(error)})")
    return diagnostic


def write_diagnostic(directory: str | os.PathLike, diagnostic: dict[str, Any]) -> Path:
    path = Path(directory) / DIAGNOSTIC_NAME
    atomic_write_json(path, diagnostic)
    return path


def read_diagnostic(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The diagnostic written beside a set, or None (none there, or unreadable: it is remade)."""
    path = Path(directory) / DIAGNOSTIC_NAME
    try:
        found = read_json(path) if path.is_file() else None
    except ValueError:  # a damaged file (JSONDecodeError)
        return None
    return found if isinstance(found, dict) else None


def diagnostic_lines(diagnostic: dict[str, Any], pairs: int = 5) -> list[str]:
    """The diagnostic as a table for a terminal (``synthkd inspect``, ``synthkd generate``)."""
    student = diagnostic["student"]
    header = f"{'class':<14} {'images':>6} {'conf':>6} {'on tgt':>6} {'divers':>6}" + (f" {'agree':>6}" if student else "") + "  flags"
    lines = [header]
    for c in diagnostic["classes"]:
        row = (f"{c['class'][:14]:<14} {c['count']:>6} {c.get('teacher_confidence', 0):>6.3f} {c.get('on_target', 0):>6.3f} "
               f"{c.get('diversity', 0):>6.3f}")
        if student:
            row += f" {c.get('agreement', 0):>6.3f}"
        lines.append(row + "  " + ", ".join(c["flags"]))
    shown = ", ".join(f"{p['pair'][0]}/{p['pair'][1]} {p['count']}" for p in diagnostic["boundary_pairs"][:pairs]) or "none"
    lines.append(f"near a boundary (top-2 margin < {diagnostic['margin']}): {diagnostic['near_boundary']} of "
                 f"{diagnostic['num_images']} images; most covered pairs: {shown}")
    if diagnostic["collapsed"]:
        lines.append(f"COLLAPSED: {', '.join(diagnostic['collapsed'])} (near-identical images in the teacher's features)")
    return lines
