"""``synthkd run CONFIG``: every stage from one YAML file, resumable, ending in a report.

Stages run in order: teacher (given, or trained) -> generate (inversion, fast or diffusion) ->
distill (e2e or neighbourhood, or Student Search with ``search.enabled``) -> evaluate, and with
``detector.enabled`` calibrate -> evaluate_detector (the student's failure detector). Each one
records, in ``RUN_DIR/stages/NAME.json``, its resolved settings and a fingerprint of its inputs:
its config section, the fingerprints of the stages it reads from, and hashes of the files it
reads from outside the run directory. On a rerun a finished stage whose fingerprint is unchanged
is skipped, an interrupted one resumes (each stage resumes from its own checkpoints), and a
changed one is cleared and rerun; the stages downstream of it change fingerprint with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator, TextIO

from accelerate import Accelerator

from synthkd.accelerator import log_shown_from, logger
from synthkd.pipelines.config import RunConfig, read_yaml_file, validate
from synthkd.data.reader import is_synthetic_dir
from synthkd.detector.detector import CONFIG_NAME as DETECTOR_CONFIG
from synthkd.detector.settings import CALIBRATION_KEYS
from synthkd.errors import SynthkdError
from synthkd.generators.registry import GENERATORS
from synthkd.io import LOCK_NAME, atomic_write, atomic_write_json, differences, sha256_file
from synthkd.models import Classifier

from .run_records import RunContext, Stage, Step, read_record, record_path

CONFIG_NAME = "config.yaml"
LOG_NAME = "run.log"


# ---------------------------------------------------------------------------------------------
# The stages


def teacher_section(config: RunConfig) -> dict[str, Any]:
    teacher = asdict(config.teacher)
    given = ("model", "weights", "input_shape", "mean", "std")
    if config.teacher.model is not None:
        return {k: teacher[k] for k in given}
    return {**{k: v for k, v in teacher.items() if k not in given}, "seed": config.seed,
            "mixed_precision": config.mixed_precision}


def teacher_inputs(config: RunConfig) -> dict[str, str]:
    """Hashes of a given teacher's files, so replacing its weights reruns everything after it."""
    spec = config.teacher
    if spec.model is None:
        return {}
    model = Path(spec.model)
    files = [model / "model.safetensors", model / "config.json"] if model.is_dir() else [Path(spec.model.rpartition(":")[0])]
    if spec.weights:
        files.append(Path(spec.weights))
    return {str(f): sha256_file(f) for f in files if f.is_file()}


def generate_inputs(config: RunConfig) -> dict[str, str]:
    """Hashes of the local files the generation method reads (a diffusers pipeline's directory), so
    one changed at the same path reruns generation and what follows."""
    section = config.generate
    found = {}
    for name in GENERATORS.get(section.method).files(section.section()):
        root = Path(name)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != LOCK_NAME) if root.is_dir() else [root]
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"{path.relative_to(root) if root.is_dir() else path.name}:{sha256_file(path)}".encode())
        found[name] = digest.hexdigest()
    return found


def run_teacher(ctx: RunContext) -> dict[str, Any]:
    from .train_teacher import train_teacher

    spec = ctx.config.teacher
    if spec.model is not None:
        teacher = ctx.teacher()
        return {"given": spec.model, "parameters": parameters(teacher), "num_classes": teacher.num_classes}
    model, metrics = train_teacher(spec.dataset, spec, ctx.run_dir / "teacher", ctx.config.seed, accelerator=ctx.accelerator)
    return {"parameters": parameters(model), "train_seconds": metrics["train_seconds"],
            "final_loss": metrics["history"][-1]["loss"]}


def generate_section(config: RunConfig) -> dict[str, Any]:
    return {**config.generate.relevant(), "seed": config.seed, "mixed_precision": config.mixed_precision}


def run_generate(ctx: RunContext) -> dict[str, Any]:
    from .generate import generate_set

    section = ctx.config.generate
    manifest = generate_set(section, ctx.teacher(), ctx.run_dir / "synthetic", ctx.config.seed, ctx.accelerator)
    results = {"method": section.method, "num_images": manifest["num_images"],
               "counts_per_class": manifest["counts_per_class"]}
    if manifest.get("report"):
        results["selection"] = manifest["report"]
    return results


def distill_section(config: RunConfig) -> dict[str, Any]:
    """The student's settings: Student Search's when it is enabled, else distillation's."""
    if config.search.enabled:
        training = {"search": asdict(config.search)}
    else:
        training = {"distill": asdict(config.distill)}
        if config.distill.augment:
            del training["distill"]["augment"]  # on, as before the option existed: old runs keep their fingerprint
        if not config.distill.teacher_views:
            del training["distill"]["teacher_views"]  # likewise
    evaluates = config.search.enabled or config.distill.eval_every_epoch
    return {**training, "student": asdict(config.student), "seed": config.seed,
            "eval_dataset": config.eval_dataset if evaluates else None, "mixed_precision": config.mixed_precision}


def run_distill(ctx: RunContext) -> dict[str, Any]:
    """The student: distilled (e2e or neighbourhood), or found by Student Search."""
    if ctx.config.search.enabled:
        return run_search(ctx)
    from .distill import distill

    config, section = ctx.config, ctx.config.distill
    student, metrics = distill(ctx.teacher(), config.student, ctx.run_dir / "synthetic", ctx.run_dir / "student", section,
                               config.seed, config.eval_dataset if section.eval_every_epoch else None, ctx.accelerator)
    results = {"mode": section.mode, "parameters": parameters(student), "distill_seconds": metrics["distill_seconds"]}
    if "merged" in metrics:
        results["merged_accuracy"] = metrics["merged"]["accuracy"]
    return results


def run_search(ctx: RunContext) -> dict[str, Any]:
    """Student Search on the run's synthetic set; the pieces are cached (``search.cache_dir``), so
    an interrupted search resumes with the pieces it had distilled."""
    from .search import search

    config, section = ctx.config, ctx.config.search
    settings = replace(section, cache_dir=section.cache_dir or str(ctx.run_dir / "search-cache"))
    student, report = search(ctx.teacher(), ctx.run_dir / "synthetic", ctx.run_dir / "student", settings, config.seed,
                             config.eval_dataset, ctx.accelerator)
    results = {"mode": "search", "parameters": parameters(student), "budget": report["budget"],
               "chosen": [row["candidate"] for row in report["chosen"]], "chosen_costs": report["chosen_costs"],
               "trained": report["trained"], "cached": report["cached"], "distill_seconds": report["explore_seconds"]}
    if "merged" in report:
        results["merged_accuracy"] = report["merged"]["accuracy"]
    return results


def run_evaluate(ctx: RunContext) -> dict[str, Any]:
    from synthkd.data import load_dataset
    from synthkd.evaluation import evaluate

    dataset = load_dataset(ctx.config.eval_dataset)
    report = {"dataset": ctx.config.eval_dataset,
              "teacher": evaluate(ctx.teacher(), dataset, ctx.accelerator),
              "student": evaluate(ctx.student(), dataset, ctx.accelerator)}
    if ctx.accelerator.is_main_process:
        atomic_write_json(ctx.run_dir / "evaluation.json", report)
    return {"teacher_accuracy": report["teacher"]["accuracy"], "student_accuracy": report["student"]["accuracy"],
            "gap_points": 100 * (report["teacher"]["accuracy"] - report["student"]["accuracy"])}


def calibration_section(config: RunConfig) -> dict[str, Any]:
    """The calibrate stage's settings; the BatchNorm weight and the smoothing only when on,
    so runs from before them keep their fingerprint."""
    section = {k: getattr(config.detector, k) for k in CALIBRATION_KEYS}
    for later_key in ("batchnorm_weight", "smoothing"):
        if not section[later_key]:
            del section[later_key]
    return {**section, "seed": config.seed}


def evaluation_section(config: RunConfig) -> dict[str, Any]:
    """The evaluate_detector stage's settings: the detector section less the calibration's."""
    return {**{k: v for k, v in asdict(config.detector).items() if k not in CALIBRATION_KEYS},
            "eval_dataset": config.eval_dataset}


def run_calibrate(ctx: RunContext) -> dict[str, Any]:
    from .calibrate import calibrate

    detector = calibrate(ctx.student(), ctx.run_dir / "synthetic", ctx.run_dir / "detector", ctx.config.detector,
                         seed=ctx.config.seed, accelerator=ctx.accelerator)
    return {"density": detector.density.kind, "layer": detector.layer, "alpha": detector.alpha}


def run_evaluate_detector(ctx: RunContext) -> dict[str, Any]:
    from .evaluate_detector import evaluate_detector

    report = evaluate_detector(ctx.student(), ctx.run_dir / "detector", ctx.config.eval_dataset,
                               ctx.run_dir / "detector-evaluation", ctx.config.detector, ctx.accelerator)
    return {"auroc": {source: scorers["detector"]["auroc"] for source, scorers in report["sources"].items()}}


def parameters(model: Classifier) -> int:
    return sum(p.numel() for p in model.parameters())


def model_saved(directory: Path) -> bool:
    return (directory / "model.safetensors").is_file() and (directory / "config.json").is_file()


STAGES: tuple[Stage, ...] = (
    Stage("teacher", (), teacher_section, run_teacher, ("teacher",),
          lambda run_dir, config: config.teacher.model is not None or model_saved(run_dir / "teacher"),
          inputs=teacher_inputs),
    Stage("generate", ("teacher",), generate_section, run_generate, ("synthetic",),
          lambda run_dir, config: is_synthetic_dir(run_dir / "synthetic"), inputs=generate_inputs),
    Stage("distill", ("teacher", "generate"), distill_section, run_distill, ("student",),
          lambda run_dir, config: model_saved(run_dir / "student") and (run_dir / "student" / "metrics.json").is_file()
          and (not config.search.enabled or (run_dir / "student" / "report.json").is_file())),
    Stage("evaluate", ("teacher", "distill"), lambda config: {"eval_dataset": config.eval_dataset}, run_evaluate,
          ("evaluation.json",), lambda run_dir, config: (run_dir / "evaluation.json").is_file(),
          enabled=lambda config: config.eval_dataset is not None),
    Stage("calibrate", ("generate", "distill"), calibration_section,
          run_calibrate, ("detector",), lambda run_dir, config: (run_dir / "detector" / DETECTOR_CONFIG).is_file(),
          enabled=lambda config: config.detector.enabled),
    Stage("evaluate_detector", ("calibrate",), evaluation_section, run_evaluate_detector, ("detector-evaluation",),
          lambda run_dir, config: (run_dir / "detector-evaluation" / "metrics.json").is_file(),
          enabled=lambda config: config.detector.enabled),
)


# ---------------------------------------------------------------------------------------------
# Planning: which stages run, resume, rerun or are skipped


def fingerprint(section: dict[str, Any], upstream: dict[str, str], inputs: dict[str, str]) -> str:
    payload = json.dumps({"config": section, "upstream": upstream, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def plan(config: RunConfig, run_dir: Path) -> list[Step]:
    """What each stage would do now, and why."""
    steps, prints = [], {}
    for stage in STAGES:
        if not stage.enabled(config):
            steps.append(Step(stage, "off", "not configured"))
            continue
        section, inputs = stage.section(config), stage.inputs(config)
        upstream = {name: prints[name] for name in stage.needs if name in prints}
        step = Step(stage, "run", "not run yet", fingerprint(section, upstream, inputs), section, upstream, inputs)
        prints[stage.name] = step.fingerprint
        record = read_record(run_dir, stage.name)
        if record is not None and record.get("fingerprint") != step.fingerprint:
            changed = differences(record.get("config", {}), section)
            changed += [f"{name} changed" for name in upstream if record.get("upstream", {}).get(name) != upstream[name]]
            changed += [f"{path} changed" for path in inputs if record.get("inputs", {}).get(path) != inputs[path]]
            step.action, step.reason = "rerun", "; ".join(changed) or "its inputs changed"
        elif record is not None and record.get("status") != "done":
            step.action, step.reason = "resume", f"{record.get('status', 'interrupted')} last time"
        elif record is not None and not stage.finished(run_dir, config):
            step.action, step.reason = "rerun", "its outputs are missing"
        elif record is not None:
            step.action, step.reason = "skip", "unchanged since it finished"
        steps.append(step)
    return steps


def size_distillation(config: RunConfig, accelerator: Accelerator, num_ranks: int) -> dict[str, Any]:
    """``synthkd run CONFIG --plan``: what the distill stage will cost in neighbourhood mode
    (:func:`synthkd.pipelines.distill.plan_distillation`), on the run's synthetic set if it is
    made, else on ``generate.num_images`` images; nothing runs and nothing is written."""
    from synthkd.data.reader import SyntheticDataset

    from .distill import plan_distillation

    if config.search.enabled:
        raise SynthkdError("--plan sizes the distill stage; this config runs Student Search (search.enabled)")
    run_dir = Path(config.out)
    if config.teacher.model is None and not (run_dir / "teacher").is_dir():
        raise SynthkdError(f"--plan times the teacher's pieces and {run_dir / 'teacher'} is not trained yet; run the "
                           "teacher stage first, or give teacher.model")
    synthetic = run_dir / "synthetic"
    num_images = len(SyntheticDataset(synthetic)) if is_synthetic_dir(synthetic) else config.generate.num_images
    ctx = RunContext(config, run_dir, accelerator)
    return plan_distillation(ctx.teacher(), config.student, num_images, run_dir / "student", config.distill, config.seed,
                             num_ranks, accelerator)


def describe_plan(steps: list[Step]) -> str:
    width = max(len(s.stage.name) for s in steps)
    return "\n".join(f"  {s.stage.name.ljust(width)}  {s.action:<6}  {s.reason}" for s in steps)


def check_run_dir(config: RunConfig, run_dir: Path, force: bool) -> None:
    """Refuse a run directory made by another config, naming what differs, unless ``force``."""
    path = run_dir / CONFIG_NAME
    if force or not path.is_file():
        return
    old = read_yaml_file(path) or {}
    errors: list[str] = []
    recorded = validate(old, errors) if isinstance(old, dict) else None
    if recorded is not None:  # defaults filled in: keys added to the schema since are no difference
        old = recorded.to_dict()
    changed = [d for d in differences(old, config.to_dict()) if not d.startswith("out:")]
    if changed:
        shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise SynthkdError(
            f"{run_dir} was made by another config ({shown}); use another out directory, or --force to rerun "
            "the stages these settings change (the others are kept)"
        )


# ---------------------------------------------------------------------------------------------
# Running


def run_pipeline(config: RunConfig, accelerator: Accelerator, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Run every enabled stage that is not up to date, then write the report; returns the summary.
    With trackers opened on ``accelerator``, the loops send their curves live."""
    from .report import write_report

    run_dir = Path(config.out)
    check_run_dir(config, run_dir, force)
    steps = plan(config, run_dir)
    ctx = RunContext(config, run_dir, accelerator)
    if config.teacher.model is not None:
        ctx.teacher()  # a given teacher that cannot be loaded is refused before anything is written
    accelerator.wait_for_everyone()  # every rank has read the records before the main process writes
    main = accelerator.is_main_process
    if main:
        import yaml

        atomic_write(run_dir / CONFIG_NAME, lambda tmp: Path(tmp).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False)))
    ctx = RunContext(config, run_dir, accelerator)
    with run_log(run_dir / LOG_NAME, quiet, main):
        if main:
            logger.info(f"synthkd run -> {run_dir}\n{describe_plan(steps)}")
        for step in steps:
            if step.action in ("skip", "off"):
                continue
            run_stage(step, ctx)
        accelerator.wait_for_everyone()
        summary = write_report(run_dir, config, steps) if main else {}
        if main:
            logger.info(f"report: {run_dir / 'report.html'}")
    accelerator.wait_for_everyone()
    return summary


def run_stage(step: Step, ctx: RunContext) -> None:
    """Run one stage between a 'running' and a 'done' record; a failure is recorded and re-raised,
    the outputs of the earlier stages stay as they were."""
    stage, accelerator, run_dir = step.stage, ctx.accelerator, ctx.run_dir
    main = accelerator.is_main_process
    previous = read_record(run_dir, stage.name) or {}
    earlier = previous.get("seconds", 0.0) if step.action == "resume" else 0.0
    if main:
        if step.action == "rerun":
            for output in stage.outputs:
                path = run_dir / output
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        record = {"name": stage.name, "status": "running", "fingerprint": step.fingerprint, "config": step.section,
                  "upstream": step.upstream, "inputs": step.inputs, "action": step.action, "reason": step.reason,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": earlier}
        atomic_write_json(record_path(run_dir, stage.name), record)
        logger.info(f"[{stage.name}] {step.action}: {step.reason}")
    accelerator.wait_for_everyone()
    started = time.perf_counter()
    try:
        results = stage.execute(ctx)
    except BaseException as error:
        if main:
            record.update(status="failed", error=f"{type(error).__name__}: {error}",
                          seconds=earlier + time.perf_counter() - started)
            atomic_write_json(record_path(run_dir, stage.name), record)
            logger.error(f"[{stage.name}] failed after {record['seconds']:.1f} s ({record['error']}); "
                         "the earlier stages' outputs are kept, rerun to resume")
        raise
    accelerator.wait_for_everyone()
    if main:
        record.update(status="done", results=results, seconds=earlier + time.perf_counter() - started,
                      finished=time.strftime("%Y-%m-%dT%H:%M:%S"), num_processes=accelerator.num_processes)
        atomic_write_json(record_path(run_dir, stage.name), record)
        logger.info(f"[{stage.name}] done in {record['seconds']:.1f} s")


# ---------------------------------------------------------------------------------------------
# Output: a log file in the run directory, the terminal unless --quiet


class _LogStream:
    """A text stream that copies whole lines to the log (a progress bar's redraws collapse to its
    last state, text after the last carriage return) and, unless quiet, everything to ``terminal``."""

    def __init__(self, log: TextIO, terminal: TextIO | None):
        self.log, self.terminal, self.pending = log, terminal, ""

    def write(self, text: str) -> int:
        if self.terminal is not None:
            self.terminal.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            line = line.rsplit("\r", 1)[-1]
            if line.strip():
                self.log.write(line + "\n")
        self.log.flush()
        return len(text)

    def flush(self) -> None:
        if self.terminal is not None:
            self.terminal.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.terminal is not None and self.terminal.isatty()


@contextmanager
def run_log(path: Path, quiet: bool, main: bool) -> Iterator[None]:
    """On the main process, stdout and stderr go to ``path`` (and to the terminal unless quiet),
    with synthkd's progress log at INFO at least; other ranks print nothing under quiet."""
    if not main and not quiet:
        yield
        return
    saved = sys.stdout, sys.stderr
    log = open(path, "a") if main else open(os.devnull, "w")
    try:
        sys.stdout = _LogStream(log, None if quiet else saved[0])
        sys.stderr = _LogStream(log, None if quiet else saved[1])
        with log_shown_from(logging.INFO):
            yield
    finally:
        sys.stdout, sys.stderr = saved
        log.close()
