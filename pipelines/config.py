"""The schema of a ``synthkd run`` YAML file: sections with defaults, validated before anything runs.

Every problem (unknown key, wrong type, missing file or dataset) is collected with its path in
the YAML and reported at once, so a user fixes a config in one pass. Command-line overrides
(``distill.epochs=5``) are applied to the YAML before validation, parsed as YAML scalars.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from synthkd.errors import SynthkdError
from synthkd.detector.settings import CalibrationSettings, DetectorEvaluationSettings
from synthkd.settings import Settings, setting, show
from synthkd.generators.fast import FastConfig
from synthkd.generators.inversion import InversionConfig, InversionLossConfig

from .distill import DistillSettings, StudentSettings
from .search import SearchSettings
from .train_teacher import TeacherSettings


@dataclass
class TeacherSection(TeacherSettings):
    """An existing teacher (``model``), or one trained here on ``dataset`` when ``model`` is null
    (with the settings of ``synthkd train-teacher``)."""

    model: str | None = field(default=None, metadata={"check": lambda value: _missing("model", value)})
    weights: str | None = field(default=None, metadata={"check": lambda value: _missing("file", value)})
    input_shape: list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    dataset: str | None = field(default=None, metadata={"check": lambda value: _missing("dataset", value)})


StudentSection = StudentSettings


@dataclass
class FastSection:
    """``generate.method: fast``: the meta-learned generator network (``synthkd generate -h``, --method fast),
    named as on the command line; the defaults are FastConfig's."""

    steps_per_batch: int = field(default=FastConfig.steps_per_batch, metadata={"positive": True})
    generator_lr: float = field(default=FastConfig.lr, metadata={"positive": True})
    latent_lr: float = field(default=FastConfig.latent_lr, metadata={"positive": True})
    meta_lr: float = field(default=FastConfig.meta_lr, metadata={"positive": True})
    bn_momentum: float = FastConfig.bn_momentum
    warmup_batches: int = FastConfig.warmup_batches
    latent_dim: int = field(default=FastConfig.latent_dim, metadata={"positive": True})
    generator_channels: int = field(default=FastConfig.channels, metadata={"positive": True})
    draws_per_adaptation: int = field(default=FastConfig.draws_per_adaptation, metadata={"positive": True})
    latent_noise: float = FastConfig.latent_noise


@dataclass
class DiffusionSection:
    """``generate.method: diffusion``: a diffusers pipeline (directory or hub id) sampled for images."""

    pipeline: str | None = None
    steps: int = field(default=50, metadata={"positive": True})
    scheduler: str | None = None          # null: the pipeline's own; ddpm, ddim, dpm-solver, ... or a class name
    guidance_scale: float | None = None   # null: the pipeline's default
    prompt_template: str = "a photo of a {name}"
    class_table: str | None = None        # JSON file or inline JSON: teacher class -> label id / prompt name
    sample_batch_size: int | None = field(default=None, metadata={"positive": True})  # null: batch_size


@dataclass
class SelectionSection:
    """Which drawn images are kept, judged by the teacher (any method; useful with diffusion)."""

    min_confidence: float = 0.0
    balance: bool = False
    max_tries: int = field(default=10, metadata={"positive": True})


@dataclass
class GenerateSection(InversionConfig):
    """The synthetic set: how many images, in shards of ``batch_size``, made by ``method``.
    The inversion settings (iterations, lr and the loss weights) serve inversion; the loss weights
    serve fast too; ``fast:`` and ``diffusion:`` hold the settings of those methods."""

    method: Literal["inversion", "fast", "diffusion"] = "inversion"
    num_images: int = field(default=6144, metadata={"positive": True})
    batch_size: int = field(default=256, metadata={"positive": True})
    fast: FastSection = field(default_factory=FastSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    selection: SelectionSection = field(default_factory=SelectionSection)

    def loss(self) -> dict[str, Any]:
        """The inversion-loss weights and views, shared by inversion and fast."""
        return {f.name: getattr(self, f.name) for f in fields(InversionLossConfig)}

    def settings(self) -> dict[str, Any]:
        """What the set depends on: the method's own settings only (another method's are ignored)."""
        settings = asdict(self)
        for method in ("fast", "diffusion"):
            if self.method != method:
                del settings[method]
        if self.selection == SelectionSection():
            del settings["selection"]  # keep all images: the fingerprint of runs made before selection existed
        if self.method == "diffusion":
            for name in (*self.loss(), "iterations", "lr"):
                del settings[name]
        elif self.method == "fast":
            del settings["iterations"], settings["lr"]
        return settings


DistillSection = DistillSettings


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
class ReportSection:
    samples_per_class: int = field(default=8, metadata={"positive": True})


@dataclass
class RunConfig(Settings):
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSection = field(default_factory=StudentSection)
    generate: GenerateSection = field(default_factory=GenerateSection)
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
    if config.generate.competition_weight != 0:
        errors.append("generate.competition_weight: a run has no student yet when it generates; "
                      "use `synthkd generate --student DIR --competition-weight W` for the competition term")
    _check_generate(config.generate, errors)
    if config.detector.enabled and config.eval_dataset is None:
        errors.append("detector: its evaluation needs eval_dataset (the in-distribution test set)")
    if teacher.input_shape is not None and len(teacher.input_shape) != 3:
        errors.append(f"teacher.input_shape: expected [C, H, W], got {show(teacher.input_shape)}")


def _check_generate(section: GenerateSection, errors: list[str]) -> None:
    """The chosen method's settings: a diffusion pipeline that exists, a readable class table,
    fast-generator fractions in range, a valid selection."""
    from synthkd.generators.diffusion import load_class_table
    from .generate import Selection

    fast, diffusion = section.fast, section.diffusion
    if section.method == "fast":
        if not fast.meta_lr <= 1:
            errors.append(f"generate.fast.meta_lr: must be in (0, 1] (the fraction of the way to the adapted weights), "
                          f"got {show(fast.meta_lr)}")
        if not 0 <= fast.bn_momentum < 1:
            errors.append(f"generate.fast.bn_momentum: must be in [0, 1), got {show(fast.bn_momentum)}")
        if fast.warmup_batches < 0:
            errors.append(f"generate.fast.warmup_batches: must not be negative, got {show(fast.warmup_batches)}")
        if fast.latent_noise < 0:
            errors.append(f"generate.fast.latent_noise: must not be negative, got {show(fast.latent_noise)}")
    if section.method == "diffusion":
        if diffusion.pipeline is None:
            errors.append("generate.diffusion.pipeline: the diffusion method needs a diffusers pipeline (a directory, "
                          "e.g. from `synthkd train-diffusion`, or a hub id owner/name)")
        elif _looks_like_path(diffusion.pipeline) and not Path(diffusion.pipeline).expanduser().is_dir():
            errors.append(f"generate.diffusion.pipeline: no pipeline directory {diffusion.pipeline}")
        if diffusion.class_table is not None:
            try:
                load_class_table(diffusion.class_table)
            except SynthkdError as error:
                errors.append(f"generate.diffusion.class_table: {error}")
    try:
        Selection(**asdict(section.selection))
    except SynthkdError as error:
        errors.append(f"generate.selection: {error}")


def _looks_like_path(spec: str) -> bool:
    """A local directory rather than a hub id (``owner/name``): absolute, relative, or deeper."""
    return Path(spec).is_absolute() or spec.startswith((".", "~")) or spec.count("/") != 1 or Path(spec).exists()


def _missing(check: str, value: str) -> str | None:
    """Why ``value`` (a model spec, file or dataset spec) cannot be read, or None."""
    from synthkd.data import check_dataset
    from synthkd.models import model_source_problem

    if check == "dataset":
        try:
            check_dataset(value)
        except SynthkdError as error:
            return str(error)
        return None
    if check == "file":
        return None if Path(value).is_file() else f"no file {value}"
    return model_source_problem(value)
