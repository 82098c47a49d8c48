"""Models from other libraries, in one spec grammar: ``SOURCE:NAME[?KEY=VALUE&KEY=VALUE]``.

``torchvision:resnet18``, ``timm:resnet18``, ``hf:DIR_OR_ID`` (a transformers image classifier;
its ``.logits`` are returned) and ``hub:DIR:ENTRY`` (an entry of a local torch.hub repository).
After ``?`` come keyword arguments of the builder, each value read as YAML
(``torchvision:resnet18?num_classes=10``, ``timm:resnet18?pretrained=true``). Weights come from
the source itself (``weights=DEFAULT``, ``pretrained=true``, an HF directory, a hub entry), or from
a file given separately. What a source knows about its input (size, normalisation) and classes
is read from it: torchvision's weights meta, timm's ``pretrained_cfg``, HF's ``id2label`` and
image processor config.

A saved model records the spec without its arguments as ``arch`` and the arguments that rebuild
the architecture without fetching weights as ``arch_kwargs`` (weights are in the model
directory), so a model of any source is saved and loaded like a zoo model. torchvision, timm and
transformers are library code; a hub entry runs the repository's ``hubconf.py``
(:func:`is_library_source` tells them apart).
"""

from __future__ import annotations

import difflib
import importlib
import json
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import SynthkdError
from ..registry import Registry
from ..settings import read_value


@dataclass
class SourceModel:
    """A network built by a source, with what the source says about it (None where it says nothing)."""

    net: nn.Module
    arch: str
    arch_kwargs: dict[str, Any]
    input_shape: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: list[str] | None = None


@dataclass(frozen=True)
class ModelSource:
    """What a source registers: ``open(name, kwargs)`` builds the network; ``classes_kwarg`` is the
    builder's argument for the number of classes (given the teacher's for a student);
    ``runs_code``: building runs code from outside the installed libraries; ``fetches(name,
    kwargs)``: what in them fetches weights (from the network or a cache), or None."""

    open: Callable[[str, dict[str, Any]], SourceModel]
    usage: str
    description: str
    classes_kwarg: str | None = None
    runs_code: bool = False
    check: Callable[[str], str | None] = field(default=lambda name: None)
    fetches: Callable[[str, dict[str, Any]], str | None] = field(default=lambda name, kwargs: None)


SOURCES: Registry[ModelSource] = Registry("model source")

# The code model directories may run: True (every architecture, what --trust-code says) or the
# architectures the user named; set by :func:`synthkd.models.classifier.trusting_code`.
TRUSTED_ARCHS: ContextVar[bool | frozenset[str]] = ContextVar("synthkd_trusted_archs", default=frozenset())


def code_trusted() -> bool:
    """Whether ``--trust-code`` is in force: the code any model names may run (an HF repository's
    own modelling code included), not only the architectures the user named."""
    return TRUSTED_ARCHS.get() is True


def register_source(name: str, *, usage: str, description: str, classes_kwarg: str | None = None,
                    runs_code: bool = False, check: Callable[[str], str | None] | None = None,
                    fetches: Callable[[str, dict[str, Any]], str | None] | None = None) -> Callable:
    def decorate(open_: Callable[[str, dict[str, Any]], SourceModel]) -> Callable:
        SOURCES.add(name, ModelSource(open_, usage, description, classes_kwarg, runs_code, check or (lambda _: None),
                                      fetches or (lambda _, __: None)))
        return open_

    return decorate


def fetching_kwargs(*keys: str) -> Callable[[str, dict[str, Any]], str | None]:
    """A source's ``fetches``: the builder arguments among ``keys`` that are set (not None/false)."""

    def fetches(name: str, kwargs: dict[str, Any]) -> str | None:
        asked = [f"{key}={kwargs[key]}" for key in keys if kwargs.get(key) not in (None, False)]
        return ", ".join(asked) or None

    return fetches


def fetch_request(spec: str, arch_kwargs: dict[str, Any]) -> str | None:
    """What in ``spec`` (with ``arch_kwargs``) would fetch weights instead of building the bare
    architecture, or None (also for a spec that names no source)."""
    parsed = parse_source(spec)
    if parsed is None:
        return None
    source, name, kwargs = parsed
    return SOURCES.get(source).fetches(name, {**kwargs, **arch_kwargs})


def source_usages() -> str:
    return ", ".join(SOURCES.get(name).usage for name in SOURCES.names())


# ----------------------------------------------------------------------------- the grammar
def parse_source(spec: str) -> tuple[str, str, dict[str, Any]] | None:
    """``SOURCE:NAME?K=V&...`` -> (source, name, keyword arguments); None where ``spec`` does not
    start with a registered source (a model directory, FILE.py:factory, module:factory, a zoo name)."""
    head, _, query = str(spec).partition("?")
    source, sep, name = head.partition(":")
    if not sep or source not in SOURCES:
        return None
    kwargs: dict[str, Any] = {}
    for pair in filter(None, query.split("&")):
        key, eq, value = pair.partition("=")
        if not eq or not key.isidentifier():
            raise SynthkdError(f"bad keyword argument {pair!r} in {spec!r}; write {head}?KEY=VALUE&KEY=VALUE")
        kwargs[key] = read_value(value)
    return source, name, kwargs


def is_source_spec(spec: str) -> bool:
    return str(spec).partition(":")[0] in SOURCES and ":" in str(spec)


def is_library_source(arch: str) -> bool:
    """Whether ``arch`` (a config's architecture) is built by installed library code only
    (torchvision, timm, transformers), so a model directory naming it runs no foreign code."""
    return is_source_spec(arch) and not SOURCES.get(str(arch).partition(":")[0]).runs_code


def source_problem(spec: str) -> str | None:
    """Why ``spec`` cannot name a model of a source, without importing the library, or None."""
    try:
        parsed = parse_source(spec)
    except SynthkdError as error:
        return str(error)
    if parsed is None:
        return f"{spec!r} names no model source; use one of {source_usages()}"
    source, name, _ = parsed
    if not name:
        return f"{spec!r} names no model; write {SOURCES.get(source).usage}"
    return SOURCES.get(source).check(name)


def open_source(spec: str, arch_kwargs: dict[str, Any] | None = None) -> SourceModel:
    """Build the model ``spec`` names, with ``arch_kwargs`` added to the spec's own arguments."""
    problem = source_problem(spec)
    if problem:
        raise SynthkdError(problem)
    source, name, kwargs = parse_source(spec)
    return SOURCES.get(source).open(name, {**kwargs, **(arch_kwargs or {})})


def classes_kwarg(spec: str) -> str | None:
    """The builder argument that sets the number of classes of ``spec``'s source, if it has one."""
    return SOURCES.get(parse_source(spec)[0]).classes_kwarg


def _library(module: str, source: str, package: str, install: str = "pip install 'synthkd[vision]'") -> Any:
    """Import ``module``, or say what to install (a torchvision built for another torch fails
    to import with a RuntimeError)."""
    try:
        return importlib.import_module(module)
    except (ImportError, RuntimeError) as error:
        detail = " ".join(str(error).split())[:200]
        raise SynthkdError(f"{source}: models need {package} ({detail}); install it with {install}") from error


def _unknown(kind: str, name: str, known: list[str], where: str) -> SynthkdError:
    close = difflib.get_close_matches(name, known, n=3)
    return SynthkdError(f"unknown {kind} model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                        + f" (the names: {where})")


def _fetch_problem(spec: str, error: Exception, offline_hint: str) -> SynthkdError:
    text = " ".join(str(error).split())[:300]
    return SynthkdError(f"cannot build {spec}: {type(error).__name__}: {text}; {offline_hint}")


# ----------------------------------------------------------------------------- torchvision
@register_source("torchvision", usage="torchvision:NAME[?weights=DEFAULT&num_classes=N]", classes_kwarg="num_classes",
                 fetches=fetching_kwargs("weights", "weights_backbone"),
                 description="torchvision.models.get_model(NAME, **kwargs); input format and classes from the weights' meta")
def torchvision_model(name: str, kwargs: dict[str, Any]) -> SourceModel:
    """``torchvision.models.get_model(name, **kwargs)``; ``weights`` is the name of a weights enum
    member (DEFAULT, IMAGENET1K_V1), whose meta gives the classes, crop size and normalisation."""
    models = _library("torchvision.models", "torchvision", "torchvision")
    if name not in models.list_models():
        raise _unknown("torchvision", name, models.list_models(), "torchvision.models.list_models()")
    kwargs = dict(kwargs)
    weights = kwargs.pop("weights", None)
    if weights is not None:
        members = models.get_model_weights(name)
        try:
            weights = members[str(weights).rpartition(".")[2]]
        except KeyError:
            raise SynthkdError(f"torchvision {name} has no weights {weights!r}; use DEFAULT or one of "
                               f"{', '.join(member.name for member in members)}") from None
    try:
        net = models.get_model(name, weights=weights, **kwargs)
    except TypeError as error:
        raise SynthkdError(f"torchvision {name}: {error}") from error
    except (OSError, RuntimeError) as error:  # urllib's URLError is an OSError
        raise _fetch_problem(f"torchvision:{name}", error, "offline, put the weights file in $TORCH_HOME/hub/checkpoints/ "
                                                           "or pass the weights as a file (--teacher-weights)") from error
    made = SourceModel(net, f"torchvision:{name}", dict(kwargs))
    # Arguments the weights imply, which a rebuild without them must repeat.
    for attribute in ("aux_logits", "transform_input"):
        if isinstance(getattr(net, attribute, None), bool):
            made.arch_kwargs[attribute] = getattr(net, attribute)
    if weights is not None:
        transform = weights.transforms()
        size = int(transform.crop_size[0])
        made.arch_kwargs["num_classes"] = len(weights.meta["categories"])
        made.input_shape, made.mean, made.std = (3, size, size), tuple(transform.mean), tuple(transform.std)
        made.class_names = list(weights.meta["categories"])
    return made


# ----------------------------------------------------------------------------- timm
TIMM_FETCHES = ("pretrained", "pretrained_cfg_overlay", "checkpoint_path")


@register_source("timm", usage="timm:NAME[?pretrained=true&num_classes=N]", classes_kwarg="num_classes",
                 fetches=fetching_kwargs(*TIMM_FETCHES),
                 description="timm.create_model(NAME, **kwargs); input size and normalisation from its pretrained_cfg")
def timm_model(name: str, kwargs: dict[str, Any]) -> SourceModel:
    """``timm.create_model(name, **kwargs)``; its ``pretrained_cfg`` gives input size and
    normalisation, and ImageNet class names where the head has ImageNet's classes.
    ``pretrained_cfg_overlay={file: PATH}`` loads pretrained weights from a local file."""
    timm = _library("timm", "timm", "timm")
    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models(), "timm.list_models()")
    try:
        net = timm.create_model(name, **kwargs)
    except TypeError as error:
        raise SynthkdError(f"timm {name}: {error}") from error
    except (OSError, RuntimeError) as error:
        raise _fetch_problem(f"timm:{name}", error, "offline, pass pretrained_cfg_overlay={file: PATH} "
                                                    "or the weights as a file (--teacher-weights)") from error
    made = SourceModel(net, f"timm:{name}", {k: v for k, v in kwargs.items() if k not in TIMM_FETCHES})
    made.arch_kwargs["num_classes"] = net.num_classes
    config = dict(getattr(net, "pretrained_cfg", {}) or {})
    if "input_size" in config:
        channels = int(kwargs.get("in_chans", config["input_size"][0]))
        made.input_shape = (channels, int(config["input_size"][1]), int(config["input_size"][2]))
        mean, std = tuple(config.get("mean", (0.0,))), tuple(config.get("std", (1.0,)))
        if len(mean) not in (1, channels):  # e.g. in_chans=1 on an RGB recipe
            mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        made.mean, made.std = mean, std
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(net)
    if subset:
        made.class_names = list(ImageNetInfo(subset).label_descriptions())
    return made


# ----------------------------------------------------------------------------- Hugging Face
class LogitsOf(nn.Module):
    """A transformers image classifier as a network that returns its logits tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).logits


@register_source("hf", usage="hf:DIR_OR_ID[?KEY=VALUE]", classes_kwarg="num_labels",
                 fetches=lambda name, kwargs: None if "config" in kwargs else f"the model {name} itself, no recorded config",
                 description="a transformers image classifier (its logits); classes from id2label, input from its "
                             "image processor config")
def hf_model(name: str, kwargs: dict[str, Any]) -> SourceModel:
    """``AutoModelForImageClassification.from_pretrained(name, **kwargs)``; a saved model rebuilds
    it from the HF config it recorded (``config``), with no access to ``name``. A repository's own
    modelling code runs only under ``--trust-code``: ``trust_remote_code`` is always passed, so
    transformers never asks on stdin. Classes from ``id2label``; input size and normalisation from
    the image processor config (``preprocessor_config.json``), else ``image_size`` of the model config."""
    transformers = _library("transformers", "hf", "transformers", "pip install transformers")
    kwargs = dict(kwargs)
    if "trust_remote_code" in kwargs:
        raise SynthkdError(f"hf:{name}: trust_remote_code is not an argument here; a repository's own code runs "
                           "only with --trust-code (pass it if you have read that code)")
    trust = {"trust_remote_code": code_trusted()}
    recorded = kwargs.pop("config", None)
    try:
        if recorded is not None:
            config = transformers.AutoConfig.for_model(**recorded)
            model = transformers.AutoModelForImageClassification.from_config(config, **trust)
        else:
            model = transformers.AutoModelForImageClassification.from_pretrained(name, **kwargs, **trust)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        if "trust_remote_code" in str(error):
            raise SynthkdError(f"hf:{name} needs its repository's own modelling code (auto_map in its config), which "
                               "runs only with --trust-code: pass it if you have read that code") from error
        if Path(name).is_dir():
            where = ""
        elif name.startswith((".", "/", "~")) or name.count("/") > 1:
            where = f" (there is no directory {name})"
        else:
            where = (f" ({name} is no local directory: where there is network, fetch it with "
                     f"`huggingface-cli download {name} --local-dir DIR` and pass hf:DIR)")
        raise _fetch_problem(f"hf:{name}", error, "the source must be a saved transformers image classifier" + where) from error
    config = model.config
    made = SourceModel(LogitsOf(model), f"hf:{name}", {"config": json.loads(config.to_json_string(use_diff=False))})
    labels = getattr(config, "id2label", None) or {}
    if labels:
        made.class_names = [str(labels[i]) for i in sorted(labels)]
    channels = int(getattr(config, "num_channels", 3))
    processor = _hf_processor_config(name) if recorded is None else {}
    size = _hf_input_size(processor) or getattr(config, "image_size", None)
    if isinstance(size, int):
        size = (size, size)
    if size:
        made.input_shape = (channels, int(size[0]), int(size[1]))
    if processor.get("do_normalize", True) and "image_mean" in processor:
        made.mean, made.std = tuple(processor["image_mean"]), tuple(processor["image_std"])
    return made


def _hf_processor_config(name: str) -> dict[str, Any]:
    """``preprocessor_config.json`` of a directory or a fetched id, or {} where there is none."""
    from transformers.utils import cached_file

    path = cached_file(name, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    return json.loads(Path(path).read_text()) if path else {}


def _hf_input_size(processor: dict[str, Any]) -> tuple[int, int] | None:
    """(H, W) the processor hands the model: the centre crop, else the resize target."""
    for key, used in (("crop_size", processor.get("do_center_crop", False)), ("size", processor.get("do_resize", True))):
        size = processor.get(key)
        if not used or size is None:
            continue
        if isinstance(size, int):
            return size, size
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    return None


# ----------------------------------------------------------------------------- torch.hub
def _hub_parts(name: str) -> tuple[Path, str]:
    directory, _, entry = name.rpartition(":")
    return Path(directory), entry


def _hub_problem(name: str) -> str | None:
    directory, entry = _hub_parts(name)
    if not str(directory) or not entry or str(directory) == ".":
        return f"hub:{name} names no entry; write hub:DIR:ENTRY (a local repository with a hubconf.py)"
    if not (directory / "hubconf.py").is_file():
        return (f"hub:{name}: {directory} is no local repository with a hubconf.py; clone it first "
                f"(git clone https://github.com/OWNER/REPO {directory}) and name the clone")
    return None


@register_source("hub", usage="hub:DIR:ENTRY[?KEY=VALUE]", runs_code=True, check=_hub_problem,
                 description="torch.hub.load(DIR, ENTRY, source='local', **kwargs): runs DIR/hubconf.py; "
                             "needs --input-shape")
def hub_model(name: str, kwargs: dict[str, Any]) -> SourceModel:
    """``torch.hub.load(DIR, ENTRY, source="local", **kwargs)``: runs the repository's hubconf.py
    (the directory is recorded as an absolute path, so a saved model loads from anywhere)."""
    directory, entry = _hub_parts(name)
    directory = directory.resolve()
    try:
        net = torch.hub.load(str(directory), entry, source="local", **kwargs)
    except (RuntimeError, TypeError, OSError, ImportError) as error:
        raise _fetch_problem(f"hub:{name}", error, f"check the entry and its arguments in {directory / 'hubconf.py'}") from error
    if not isinstance(net, nn.Module):
        raise SynthkdError(f"hub:{name} returned a {type(net).__name__}, not a torch.nn.Module")
    return SourceModel(net, f"hub:{directory}:{entry}", dict(kwargs))
