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

from synthkd.accelerator import accelerate_precision, mixed_precision_setting
from synthkd.data import check_dataset
from synthkd.errors import SynthkdError, one_line
from synthkd.detector.settings import CalibrationSettings, DetectorEvaluationSettings
from synthkd.generators.registry import GENERATORS
from synthkd.models import is_source_spec
from synthkd.settings import Settings, load_yaml, read_value, refusal, setting, show

from .generate import GenerateSettings

from .distill import BIRTH_OPTIONS, DistillSettings, StudentSettings
from .search import SearchSettings
from .train_teacher import TeacherSettings


def file_problem(path: str) -> str | None:
    return None if Path(path).is_file() else f"no file {path}"


def model_problem(spec: str) -> str | None:
    from synthkd.models import model_source_problem

    return model_source_problem(spec)


@dataclass
class TeacherSection(TeacherSettings):
    """An existing teacher (``model``), or one trained here on ``dataset`` when ``model`` is null
    (with the settings of ``synthkd train-teacher``)."""

    model: str | None = setting(None, check=model_problem,
                                help="An existing teacher: a model directory, a model source (torchvision:NAME, timm:NAME, hf:DIR, "
                                     "hub:DIR:ENTRY, with ?KEY=VALUE arguments), or FILE.py:factory / module:factory.")
    weights: str | None = setting(None, check=file_problem,
                                  help="Weights of a teacher given as code or source (safetensors or a state dict).")
    input_shape: list[int] | None = setting(None, help="C, H, W of a teacher given as code (overrides a source's).")
    mean: list[float] | None = setting(None, help="Normalisation mean of a teacher given as code.")
    std: list[float] | None = setting(None, help="Normalisation std of a teacher given as code.")
    dataset: str | None = setting(None, check=refusal(check_dataset),
                                  help="Train a teacher on this dataset spec when no model is given.")


@dataclass
class SearchSection(SearchSettings):
    """Student Search instead of distillation (``synthkd search -h``); the ``distill`` keys are then unused."""

    enabled: bool = False


@dataclass
class DetectorSection(DetectorEvaluationSettings, CalibrationSettings):
    """The failure detector of the student: a density of its features calibrated on the synthetic
    set (``calibrate``, :class:`CalibrationSettings`), then scored on ``eval_dataset`` against its
    mistakes, out-of-distribution sets and attacks (``evaluate_detector``,
    :class:`DetectorEvaluationSettings`). See ``synthkd calibrate -h``."""

    enabled: bool = setting(False, help="Calibrate and evaluate the student's failure detector.", cli=False)


@dataclass
class ReportSection(Settings):
    samples_per_class: int = setting(8, positive=True, help="Synthetic images shown per class in report.html.")


@dataclass
class RunConfig(Settings):
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSettings = field(default_factory=StudentSettings)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    search: SearchSection = field(default_factory=SearchSection)
    detector: DetectorSection = field(default_factory=DetectorSection)
    report: ReportSection = field(default_factory=ReportSection)
    eval_dataset: str | None = setting(None, check=refusal(check_dataset),
                                       help="The real test set every stage is evaluated on.")
    out: str | None = setting(None, help="The run directory; null: runs/<config file name>.")
    seed: int = setting(0, help="Seed of every stage.")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = mixed_precision_setting()
    reference_epochs: int | None = setting(None, help="KD on real data, read by the benchmarks only.")


# ---------------------------------------------------------------------------------------------
# Loading, overrides, validation


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a config; raises one :class:`SynthkdError` listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise SynthkdError(f"config file {path} does not exist")
    raw = read_yaml_file(path) or {}
    if not isinstance(raw, dict):
        raise SynthkdError(f"{path} must hold a mapping of sections (teacher:, generate:, ...), got {type(raw).__name__}")
    errors = apply_overrides(raw, overrides)
    config = validate(raw, errors)
    if config is None or errors:
        listed = "\n  ".join(errors)
        raise SynthkdError(f"{path}: {len(errors)} problem{'s' if len(errors) > 1 else ''}:\n  {listed}")
    if config.out is None:
        config.out = str(Path("runs") / path.stem)
    # null: what Accelerate will run at, so the records and fingerprints say what ran (a run under
    # `accelerate launch --mixed_precision bf16` is not the one without)
    config.mixed_precision = accelerate_precision(config.mixed_precision)
    return config


def read_yaml_file(path: Path) -> Any:
    """The YAML in ``path``, bounded (:func:`load_yaml`); text that is not UTF-8 YAML is refused."""
    import yaml

    try:
        return load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise SynthkdError(f"{path} is not a YAML text file ({one_line(error)}); give a run config "
                           "(see configs/ for examples)") from error


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Set ``a.b=value`` entries in ``raw`` (values parsed as YAML); returns the malformed ones."""
    errors = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            errors.append(f"{item}: an override is KEY=VALUE, e.g. distill.epochs=5")
            continue
        value = read_value(text)
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
    if teacher.model is not None and not Path(teacher.model).is_dir() and not is_source_spec(teacher.model) \
            and (teacher.weights is None or teacher.input_shape is None):  # a source brings its weights
        errors.append(f"teacher.model: {teacher.model!r} is not a model directory; a teacher given as code needs "
                      "teacher.weights and teacher.input_shape (and mean/std)")
    _check_generate(config, errors)
    _check_cuts(config, errors)
    if config.detector.enabled and config.eval_dataset is None:
        errors.append("detector: its evaluation needs eval_dataset (the in-distribution test set)")
    if teacher.input_shape is not None and len(teacher.input_shape) != 3:
        errors.append(f"teacher.input_shape: expected [C, H, W], got {show(teacher.input_shape)}")


def _check_cuts(config: RunConfig, errors: list[str]) -> None:
    """Neighbourhood mode's cuts name modules of a zoo student (checked on the bare network, before
    any training; a student given as a directory or code is checked when it is loaded)."""
    from synthkd.models import create_model, parse_zoo_spec
    from synthkd.models.neighbourhoods import resolve_cuts

    student = config.student
    parsed = parse_zoo_spec(student.arch)
    if config.distill.mode != "neighbourhood" or config.search.enabled or parsed is None:
        return
    name, kwargs = parsed
    for key in ("sparsity", *BIRTH_OPTIONS):  # applied to the built student, not arguments of its architecture
        kwargs.pop(key, None)
    try:  # module paths depend on the structure only, not on the widths
        resolve_cuts(create_model(name, **{"width": student.width or 1.0, **kwargs}), config.distill.cuts)
    except SynthkdError as error:
        errors.append(f"distill.cuts: {error}")


def _check_generate(config: RunConfig, errors: list[str]) -> None:
    """What a run can generate: images (a run distills from them), with no competitor (a run has
    no student yet when it generates, so the competition weight is settled to 0 here)."""
    section = config.generate
    if section.competition_weight:
        errors.append("generate.competition_weight: a run has no student yet when it generates; "
                      "use `synthkd generate --student DIR --competition-weight W` for the competition term")
    if section.boundary.on("adversarial"):
        errors.append("generate.boundary.techniques: adversarial needs a student, which a run does not have when it "
                      "generates; use `synthkd generate --student DIR` or `synthkd distill --synthesize fast`")
    config.generate = section.with_competitor(False)
    if section.method in GENERATORS and GENERATORS.get(section.method).output != "images":
        errors.append(f"generate.method: {section.method} makes no images for a run to distill from; "
                      f"use `synthkd generate --method {section.method}` and `synthkd distill` instead")
