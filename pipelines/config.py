"""The schema of a ``synthkd run`` YAML file: sections with defaults, validated before anything runs.

Every problem (unknown key, wrong type, missing file or dataset) is collected with its path in
the YAML and reported at once, so a user fixes a config in one pass. Command-line overrides
(``distill.epochs=5``) are applied to the YAML before validation, parsed as YAML scalars.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from synthkd.errors import SynthkdError
from synthkd.generators.registry import GENERATORS
from synthkd.settings import Settings, show

from .generate import GenerateSettings


@dataclass
class TeacherSection:
    """An existing teacher (``model``), or one trained here on ``dataset`` when ``model`` is null."""

    model: str | None = field(default=None, metadata={"check": lambda value: _missing("model", value)})
    weights: str | None = field(default=None, metadata={"check": lambda value: _missing("file", value)})
    input_shape: list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    arch: str = "resnet20"
    width: float = field(default=1.0, metadata={"positive": True})
    dataset: str | None = field(default=None, metadata={"check": lambda value: _missing("dataset", value)})
    epochs: int = field(default=15, metadata={"positive": True})
    batch_size: int = field(default=128, metadata={"positive": True})
    lr: float = field(default=0.1, metadata={"positive": True})
    flip: bool = True


@dataclass
class StudentSection:
    """A zoo architecture at ``width``, or a model directory / FILE.py:factory to start from."""

    arch: str = field(default="resnet20", metadata={"check": lambda value: _missing("student", value)})
    width: float = field(default=0.5, metadata={"positive": True})


@dataclass
class DistillSection:
    """End-to-end KD, or neighbourhood by neighbourhood (then an optional e2e fine-tune)."""

    mode: Literal["e2e", "neighbourhood"] = "e2e"
    epochs: int = field(default=50, metadata={"positive": True})
    batch_size: int = field(default=128, metadata={"positive": True})
    lr: float | None = field(default=None, metadata={"positive": True})  # null: 0.05 (e2e, SGD) or 0.01 (neighbourhood, Adam)
    temperature: float = field(default=4.0, metadata={"positive": True})
    mixup: float = 1.0
    flip: bool = True
    cuts: str = "blocks"
    finetune_epochs: int = 0
    finetune_lr: float = field(default=0.01, metadata={"positive": True})
    eval_every_epoch: bool = True

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.05 if self.mode == "e2e" else 0.01


@dataclass
class SearchSection:
    """Student Search instead of distillation: the student with the least local error under
    ``budget``, picked per neighbourhood from a candidate grid (``synthkd search -h``)."""

    enabled: bool = False
    budget: str = "params=0.5"            # params|flops|latency=VALUE: a fraction of the teacher's or absolute
    candidates: str = "width=0.25,0.5,0.75,1.0"  # grid width=...;depth=...;sparsity=..., or FILE.py:factory
    cuts: str = "stages"
    epochs: int = field(default=5, metadata={"positive": True})
    sparsity_epochs: int | None = field(default=None, metadata={"positive": True})  # null: epochs // 2
    finetune_epochs: int = 0
    finetune_lr: float = field(default=0.01, metadata={"positive": True})
    batch_size: int = field(default=128, metadata={"positive": True})
    lr: float = field(default=0.01, metadata={"positive": True})
    cache_dir: str | None = None          # null: RUN_DIR/search-cache; share one between runs to reuse pieces


@dataclass
class DetectorSection:
    """The failure detector of the student: a density of its features calibrated on the synthetic
    set (``calibrate``), then scored on ``eval_dataset`` against its mistakes, out-of-distribution
    sets and attacks (``evaluate_detector``). See ``synthkd calibrate -h``."""

    enabled: bool = False
    density: str = "gmm"             # gmm, gmm-diag or flow
    alpha: float = field(default=0.05, metadata={"positive": True})
    layer: str | None = None         # null: the penultimate features
    components: int | None = field(default=None, metadata={"positive": True})
    holdout: float = field(default=0.2, metadata={"positive": True})
    batchnorm_weight: float = 0.0    # weight of the deviation from the student's BatchNorm statistics (0: off)
    smoothing: float = 0.0           # variance of the noise that widens the density (0: off; README)
    ood: list[str] = field(default_factory=list)      # dataset specs or aliases (noise, digits, ...)
    attacks: list[Literal["fgsm", "pgd"]] = field(default_factory=list)
    epsilon: float = field(default=0.1, metadata={"positive": True})
    pgd_steps: int = field(default=10, metadata={"positive": True})
    limit: int | None = field(default=None, metadata={"positive": True})  # inputs per source


@dataclass
class ReportSection:
    samples_per_class: int = field(default=8, metadata={"positive": True})


@dataclass
class RunConfig(Settings):
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSection = field(default_factory=StudentSection)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    distill: DistillSection = field(default_factory=DistillSection)
    search: SearchSection = field(default_factory=SearchSection)
    detector: DetectorSection = field(default_factory=DetectorSection)
    report: ReportSection = field(default_factory=ReportSection)
    eval_dataset: str | None = field(default=None, metadata={"check": lambda value: _missing("dataset", value)})
    out: str | None = None  # the run directory; null: runs/<config file name>
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    reference_epochs: int | None = None  # KD on real data, read by the benchmarks only


# ---------------------------------------------------------------------------------------------
# Loading, overrides, validation


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a config; raises one :class:`SynthkdError` listing every problem."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SynthkdError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise SynthkdError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise SynthkdError(f"{path} must hold a mapping of sections (teacher:, generate:, ...), got {type(raw).__name__}")
    errors = apply_overrides(raw, overrides)
    config = validate(raw, errors)
    if config is None or errors:
        listed = "\n  ".join(errors)
        raise SynthkdError(f"{path}: {len(errors)} problem{'s' if len(errors) > 1 else ''}:\n  {listed}")
    if config.out is None:
        config.out = str(Path("runs") / path.stem)
    return config


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Set ``a.b=value`` entries in ``raw`` (values parsed as YAML); returns the malformed ones."""
    import yaml

    errors = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            errors.append(f"{item}: an override is KEY=VALUE, e.g. distill.epochs=5")
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                errors.append(f"{'.'.join(parts[:depth + 1])}: is a value, not a section; cannot set {key}")
                break
            node = child
        else:
            node[parts[-1]] = value
    return errors


def validate(raw: dict[str, Any], errors: list[str]) -> RunConfig | None:
    """Build a :class:`RunConfig` from ``raw``, appending every problem to ``errors``."""
    config = RunConfig.from_mapping(raw, "", errors)
    if config is None:
        return None
    _check_semantics(config, errors)
    return config


def _check_semantics(config: RunConfig, errors: list[str]) -> None:
    """Cross-field rules and every file or dataset the run will read."""
    teacher = config.teacher
    if teacher.model is None and teacher.dataset is None:
        errors.append("teacher: give model (an existing teacher: model directory or FILE.py:factory) "
                      "or dataset (a dataset spec to train one on)")
    if teacher.model is not None and not Path(teacher.model).is_dir() and (teacher.weights is None or teacher.input_shape is None):
        errors.append(f"teacher.model: {teacher.model!r} is not a model directory; a teacher given as code needs "
                      "teacher.weights and teacher.input_shape (and mean/std)")
    _check_generate(config, errors)
    if config.search.enabled:
        from synthkd.search import parse_budget

        try:
            parse_budget(config.search.budget)
        except SynthkdError as error:
            errors.append(f"search.budget: {error}")
    detector = config.detector
    if detector.enabled:
        from synthkd.detector import DENSITIES

        if detector.density not in DENSITIES:
            errors.append(f"detector.density: expected one of {', '.join(DENSITIES)}, got {show(detector.density)}")
        if not detector.holdout < 1 or not detector.alpha < 1:
            errors.append("detector: alpha and holdout are fractions between 0 and 1")
        if detector.batchnorm_weight < 0:
            errors.append(f"detector.batchnorm_weight: expected 0 (off) or a positive weight, got {show(detector.batchnorm_weight)}")
        if detector.smoothing < 0:
            errors.append(f"detector.smoothing: expected 0 (off) or a positive noise variance, got {show(detector.smoothing)}")
        if config.eval_dataset is None:
            errors.append("detector: its evaluation needs eval_dataset (the in-distribution test set)")
    if teacher.input_shape is not None and len(teacher.input_shape) != 3:
        errors.append(f"teacher.input_shape: expected [C, H, W], got {show(teacher.input_shape)}")


def _check_generate(config: RunConfig, errors: list[str]) -> None:
    """What a run can generate: images (a run distills from them), with no competitor (a run has
    no student yet when it generates, so the competition weight is settled to 0 here)."""
    section = config.generate
    if section.competition_weight:
        errors.append("generate.competition_weight: a run has no student yet when it generates; "
                      "use `synthkd generate --student DIR --competition-weight W` for the competition term")
    config.generate = section.with_competitor(False)
    if section.method in GENERATORS and GENERATORS.get(section.method).output != "images":
        errors.append(f"generate.method: {section.method} makes no images for a run to distill from; "
                      f"use `synthkd generate --method {section.method}` and `synthkd distill` instead")


def _missing(check: str, value: str) -> str | None:
    """Why ``value`` (a model spec, file or dataset spec) cannot be read, or None."""
    from synthkd.data import check_dataset
    from synthkd.models import is_registered

    if check == "dataset":
        try:
            check_dataset(value)
        except SynthkdError as error:
            return str(error)
        return None
    if check == "file":
        return None if Path(value).is_file() else f"no file {value}"
    if check == "student" and is_registered(value):
        return None
    if Path(value).is_dir():
        return None
    module_or_file, sep, _ = value.rpartition(":")
    if sep and module_or_file.endswith(".py"):
        return None if Path(module_or_file).is_file() else f"no file {module_or_file}"
    if sep:
        return None  # package.module:factory, imported when the stage runs
    what = "a zoo architecture, " if check == "student" else ""
    return f"{value!r} is neither {what}a model directory nor FILE.py:factory"

