"""The report of a ``synthkd run``: ``report.md``, ``report.html`` (the same content, PNGs inline
by relative path) and ``summary.json`` with every headline figure, rebuilt from the run
directory's stage records and artefacts after every run."""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any, TYPE_CHECKING

from .config import RunConfig
from synthkd.generators.diagnostic import read_diagnostic
from synthkd.io import atomic_write, atomic_write_json, read_json

if TYPE_CHECKING:
    from .run_records import Step

FIGURES = "report"  # PNGs live in RUN_DIR/report/, referenced relatively from the pages

Block = tuple  # ("h2", text) | ("p", text) | ("table", header, rows) | ("img", relative path, caption)


def write_report(run_dir: Path, config: RunConfig, steps: list["Step"]) -> dict[str, Any]:
    """Write the figures, both pages and ``summary.json``; returns the summary."""
    import matplotlib

    matplotlib.use("Agg")
    from .run_records import read_record

    records = {s.stage.name: read_record(run_dir, s.stage.name) for s in steps}
    results = {name: (r or {}).get("results", {}) for name, r in records.items()}
    summary = headline(run_dir, results)
    summary["stages"] = {s.stage.name: {"action": s.action, "seconds": (records[s.stage.name] or {}).get("seconds"),
                                        "status": (records[s.stage.name] or {}).get("status")} for s in steps}
    summary["total_seconds"] = sum(v["seconds"] or 0.0 for v in summary["stages"].values())
    (run_dir / FIGURES).mkdir(parents=True, exist_ok=True)

    blocks: list[Block] = [("h1", f"synthkd run: {run_dir.name}"),
                           ("p", f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}; settings in config.yaml, log in run.log.")]
    blocks += headline_blocks(summary)
    blocks += stage_blocks(steps, records)
    for figure in (sample_grid, diagnostic_blocks, curves_figure, neighbourhood_figure, search_blocks, per_class_figure,
                   detector_blocks):
        blocks += figure(run_dir, config)
    atomic_write(run_dir / "report.md", lambda tmp: Path(tmp).write_text(to_markdown(blocks)))
    atomic_write(run_dir / "report.html", lambda tmp: Path(tmp).write_text(to_html(blocks, run_dir.name)))
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def headline(run_dir: Path, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every figure worth a line: accuracies, sizes, data, neighbourhood errors."""
    summary: dict[str, Any] = {"run_dir": str(run_dir)}
    teacher, student = results.get("teacher", {}), results.get("distill", {})
    if "parameters" in teacher:
        summary["teacher_parameters"] = teacher["parameters"]
    if "parameters" in student:
        summary["student_parameters"] = student["parameters"]
        summary["distill_mode"] = student["mode"]
        if "teacher_parameters" in summary:
            summary["compression"] = summary["teacher_parameters"] / student["parameters"]
    if "merged_accuracy" in student:
        summary["merged_accuracy_before_finetune"] = student["merged_accuracy"]
    if "num_images" in results.get("generate", {}):
        summary["num_synthetic_images"] = results["generate"]["num_images"]
        summary["generate_method"] = results["generate"].get("method", "inversion")
    if student.get("mode") == "search":
        summary["search"] = {key: student[key] for key in ("budget", "chosen", "chosen_costs", "trained", "cached")}
    evaluation_file = run_dir / "evaluation.json"
    if results.get("evaluate") and evaluation_file.is_file():
        evaluation = read_json(evaluation_file)
        summary.update(results["evaluate"], eval_dataset=evaluation["dataset"],
                       per_class={"teacher": evaluation["teacher"]["per_class"], "student": evaluation["student"]["per_class"]})
    if results.get("evaluate_detector"):
        summary["detector_auroc"] = results["evaluate_detector"]["auroc"]
    neighbourhoods = neighbourhood_errors(run_dir)
    if neighbourhoods:
        summary["neighbourhood_relative_mse"] = neighbourhoods
    diagnostic = read_diagnostic(run_dir / "synthetic")
    if diagnostic is not None:
        summary["synthetic_collapsed_classes"] = diagnostic["collapsed"]
        summary["synthetic_near_boundary"] = diagnostic["near_boundary"]
    return summary


def neighbourhood_errors(run_dir: Path) -> dict[str, float]:
    metrics = run_dir / "student" / "metrics.json"
    if not metrics.is_file():
        return {}
    return {name: record["relative_mse"] for name, record in read_json(metrics).get("neighbourhoods", {}).items()}


def headline_blocks(summary: dict[str, Any]) -> list[Block]:
    rows = []
    for key, label in (("teacher_accuracy", "teacher accuracy"), ("student_accuracy", "student accuracy"),
                       ("gap_points", "gap (points)"), ("merged_accuracy_before_finetune", "merged neighbourhoods, before fine-tune"),
                       ("teacher_parameters", "teacher parameters"), ("student_parameters", "student parameters"),
                       ("compression", "compression"), ("num_synthetic_images", "synthetic images"),
                       ("total_seconds", "stage time, total (s)")):
        if key in summary:
            rows.append([label, fmt(summary[key], percent=key.endswith("accuracy") or key.endswith("finetune"))])
    title = f"Headline ({summary['eval_dataset']})" if "eval_dataset" in summary else "Headline"
    return [("h2", title), ("table", ["", "value"], rows)]


def stage_blocks(steps: list["Step"], records: dict[str, dict | None]) -> list[Block]:
    rows = []
    for step in steps:
        record = records[step.stage.name] or {}
        seconds = record.get("seconds")
        rows.append([step.stage.name, step.action, step.reason, record.get("status", "-"),
                     "-" if seconds is None else f"{seconds:.1f}"])
    return [("h2", "Stages"), ("table", ["stage", "this run", "why", "status", "seconds"], rows)]


def fmt(value: Any, percent: bool = False) -> str:
    if percent:
        return f"{100 * value:.2f}%"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def save(figure, run_dir: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    relative = f"{FIGURES}/{name}"
    figure.tight_layout()
    atomic_write(run_dir / relative, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
    return relative


# ---------------------------------------------------------------------------------------------
# Figures: each returns its blocks, or none when the run has nothing to show for it


def sample_grid(run_dir: Path, config: RunConfig) -> list[Block]:
    import matplotlib.pyplot as plt
    import torch

    from synthkd.data.reader import SyntheticDataset, is_synthetic_dir

    if not is_synthetic_dir(run_dir / "synthetic"):
        return []
    data = SyntheticDataset(run_dir / "synthetic", verify=False)
    names = data.manifest.get("teacher", {}).get("class_names") or [str(i) for i in range(data.num_classes)]
    columns = config.report.samples_per_class
    figure, axes = plt.subplots(data.num_classes, columns, figsize=(columns * 0.9, data.num_classes * 0.9), squeeze=False)
    for row, name in enumerate(names):
        members = torch.nonzero(data.targets == row).flatten()[:columns]
        for column in range(columns):
            axis = axes[row][column]
            axis.axis("off")
            if column < len(members):
                image = data.images[members[column]].float().clamp(0, 1).numpy()
                axis.imshow(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
        axes[row][0].text(-0.1, 0.5, name, transform=axes[row][0].transAxes, ha="right", va="center", fontsize=8)
    path = save(figure, run_dir, "samples.png")
    return [("h2", "Synthetic samples"),
            ("img", path, f"{columns} synthetic images per class (rows: the class each was optimised towards)")]


def diagnostic_blocks(run_dir: Path, config: RunConfig) -> list[Block]:
    """The synthetic set's per-class diagnostic (``synthetic/diagnostic.json``, written by the
    generate stage): what the set covers, with no real data."""
    diagnostic = read_diagnostic(run_dir / "synthetic")
    if diagnostic is None:
        return []
    student = diagnostic["student"]
    rows = [[c["class"], fmt(c["count"]), f"{c.get('teacher_confidence', 0):.3f}", f"{c.get('on_target', 0):.3f}",
             f"{c.get('diversity', 0):.3f}", *([f"{c.get('agreement', 0):.3f}"] if student else []),
             ", ".join(c["flags"]) or "-"] for c in diagnostic["classes"]]
    pairs = ", ".join(f"{p['pair'][0]} / {p['pair'][1]}: {p['count']}" for p in diagnostic["boundary_pairs"][:8]) or "none"
    collapsed = ", ".join(diagnostic["collapsed"]) or "none"
    return [("h2", "Synthetic set diagnostic"),
            ("p", f"Per class aimed at: the teacher's mean probability of it, the share it names it, the mean "
                  f"nearest-neighbour distance of the teacher's unit-length penultimate features (diversity). Collapsed "
                  f"classes: {collapsed}. Near a boundary (top-2 margin < {diagnostic['margin']}): "
                  f"{diagnostic['near_boundary']} of {diagnostic['num_images']} images; by pair: {pairs}."),
            ("table", ["class", "images", "confidence", "on target", "diversity", *(["agreement"] if student else []), "flags"],
             rows)]


def curves_figure(run_dir: Path, config: RunConfig) -> list[Block]:
    import matplotlib.pyplot as plt

    from .run_records import training_curves

    phases = {**training_curves(run_dir, "teacher"), **training_curves(run_dir, "distill")}
    if not phases:
        return []
    figure, axes = plt.subplots(1, len(phases), figsize=(4.5 * len(phases), 3.2), squeeze=False)
    for axis, (phase, history) in zip(axes[0], phases.items()):
        epochs = [r["epoch"] for r in history]
        axis.plot(epochs, [r["loss"] for r in history], color="tab:blue", marker=".")
        axis.set(title=phase, xlabel="epoch", ylabel="loss")
        if all("eval_accuracy" in r for r in history):
            twin = axis.twinx()
            twin.plot(epochs, [r["eval_accuracy"] for r in history], color="tab:orange", marker=".")
            twin.set_ylabel(f"accuracy on {config.eval_dataset}", color="tab:orange")
    path = save(figure, run_dir, "curves.png")
    return [("h2", "Training curves"), ("img", path, "loss per epoch (blue) and, where measured, accuracy (orange)")]


def neighbourhood_figure(run_dir: Path, config: RunConfig) -> list[Block]:
    import matplotlib.pyplot as plt

    errors = neighbourhood_errors(run_dir)
    if not errors:
        return []
    figure, axis = plt.subplots(figsize=(max(4.0, 0.6 * len(errors)), 3.2))
    axis.bar(range(len(errors)), list(errors.values()), color="tab:purple")
    axis.set_xticks(range(len(errors)), list(errors), rotation=60, ha="right", fontsize=7)
    axis.set(ylabel="relative MSE (held out)", title="local error per neighbourhood")
    path = save(figure, run_dir, "neighbourhoods.png")
    rows = [[name, f"{value:.4f}"] for name, value in errors.items()]
    return [("h2", "Neighbourhoods"), ("img", path, "relative MSE of each student neighbourhood against its teacher "
                                                    "neighbourhood, on held-out synthetic inputs"),
            ("table", ["neighbourhood", "relative MSE"], rows)]


def per_class_figure(run_dir: Path, config: RunConfig) -> list[Block]:
    import matplotlib.pyplot as plt
    import numpy as np

    if not (run_dir / "evaluation.json").is_file():
        return []
    evaluation = read_json(run_dir / "evaluation.json")
    names = list(evaluation["teacher"]["per_class"])
    teacher = [evaluation["teacher"]["per_class"][n] for n in names]
    student = [evaluation["student"]["per_class"].get(n, 0.0) for n in names]
    figure, axis = plt.subplots(figsize=(max(5.0, 0.7 * len(names)), 3.4))
    positions = np.arange(len(names))
    axis.bar(positions - 0.2, teacher, 0.4, label="teacher")
    axis.bar(positions + 0.2, student, 0.4, label="student")
    axis.set_xticks(positions, names, rotation=45, ha="right", fontsize=8)
    axis.set(ylabel="accuracy", ylim=(0, 1), title=f"per-class accuracy on {evaluation['dataset']}")
    axis.legend(loc="lower right")
    path = save(figure, run_dir, "per_class.png")
    rows = [[n, fmt(t, percent=True), fmt(s, percent=True)] for n, t, s in zip(names, teacher, student)]
    return [("h2", "Teacher vs student"), ("img", path, "accuracy per class"),
            ("table", ["class", "teacher", "student"], rows)]


def search_blocks(run_dir: Path, config: RunConfig) -> list[Block]:
    """Student Search: the candidate chosen per neighbourhood and the frontier it was picked from
    (``student/report.json`` and ``student/frontier.png``, written by the search)."""
    report_file = run_dir / "student" / "report.json"
    if not config.search.enabled or not report_file.is_file():
        return []
    report = read_json(report_file)
    kind = report["kind"]
    rows = [[row["neighbourhood"], row["candidate"], f"{row['relative_mse']:.4f}", fmt(row["costs"][kind])]
            for row in report["chosen"]]
    blocks: list[Block] = [
        ("h2", "Student Search"),
        ("p", f"Budget {report['budget']}: {kind} at most {fmt(report['limit'])} (teacher {fmt(report['teacher_costs'][kind])}); "
              f"chosen {fmt(report['chosen_costs'][kind])}. {report['trained']} pieces distilled, {report['cached']} "
              f"from the cache, candidates cut at {report['cuts']}."),
        ("table", ["neighbourhood", "candidate", "relative MSE", kind], rows),
    ]
    if (run_dir / "student" / "frontier.png").is_file():
        blocks.append(("img", "student/frontier.png", "summed local error against cost: the frontier, the uniform "
                                                      "students and the chosen one"))
    return blocks


def detector_blocks(run_dir: Path, config: RunConfig) -> list[Block]:
    """AUROC of every scorer per failure source, and the ROC / histogram plots the detector
    evaluation wrote (referenced where they are)."""
    metrics_file = run_dir / "detector-evaluation" / "metrics.json"
    if not metrics_file.is_file():
        return []
    metrics = read_json(metrics_file)
    scorers = list(next(iter(metrics["sources"].values()), {}))
    rows = [[source, *(f"{by_scorer[sc]['auroc']:.3f}" for sc in scorers)] for source, by_scorer in metrics["sources"].items()]
    blocks: list[Block] = [
        ("h2", "Failure detector"),
        ("p", f"Density {metrics['detector']['density']} of the student's {metrics['detector']['layer']} features, "
              f"calibrated on the synthetic set; AUROC of telling each failure source from the correctly handled "
              f"inputs of {metrics['dataset']} (higher is better)."),
        ("table", ["failure source", *scorers], rows),
    ]
    for name in metrics.get("plots", []):
        if (run_dir / "detector-evaluation" / name).is_file():
            blocks.append(("img", f"detector-evaluation/{name}", name.removesuffix(".png")))
    return blocks


# ---------------------------------------------------------------------------------------------
# Rendering the same blocks as Markdown and as HTML


def to_markdown(blocks: list[Block]) -> str:
    lines = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            lines += [f"{'#' * int(kind[1])} {block[1]}", ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", "", f"*{block[2]}*", ""]
        elif kind == "table":
            header, rows = block[1], block[2]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows] + [""]
    return "\n".join(lines)


def to_html(blocks: list[Block], title: str) -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "img":
            body.append(f'<figure><img src="{html.escape(block[1])}" alt="{html.escape(block[2])}">'
                        f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
        elif kind == "table":
            header = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
             "img{max-width:100%}figcaption{color:#555;font-size:90%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
