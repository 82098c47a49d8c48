"""Models: the zoo, the :class:`Classifier` wrapper and loading of saved or user models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ..errors import SynthkdError
from . import born, chain, resnet, thinning  # noqa: F401  (registers the zoo)
from .classifier import (Classifier, InputFormat, ModelConfig, arch_needs_trust, build_network, import_factory, load_weights,
                         trusting_code, unwrap, weights_fingerprint)
from .registry import MODELS, create_model, is_registered, list_models, parse_zoo_spec, register_model
from .sources import SOURCES, SourceModel, classes_kwarg, is_library_source, is_source_spec, open_source, source_problem, source_usages

__all__ = [
    "MODELS", "SOURCES", "Classifier", "InputFormat", "ModelConfig", "arch_needs_trust", "classes_kwarg", "count_classes",
    "create_model", "import_factory", "is_library_source", "is_registered", "is_source_spec", "list_models", "load_model",
    "model_source_problem", "open_source", "register_model", "trusting_code", "unwrap", "weights_fingerprint",
]


def load_model(
    spec: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    input_shape: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Classifier:
    """Load a saved model directory, or build a model source (``torchvision:NAME``, ``timm:NAME``,
    ``hf:DIR``, ``hub:DIR:ENTRY``), ``FILE.py:factory``, ``module:factory`` or a zoo name. A source
    gives its own input format and class names where it has them; ``input_shape``, ``mean`` and
    ``std`` override them. The number of classes is read from the output."""
    path = Path(spec)
    if path.is_dir():
        if weights is not None:
            raise SynthkdError(f"{spec} is a model directory; it carries its own weights, drop --weights")
        return Classifier.from_pretrained(path)
    spec = str(spec)
    if is_source_spec(spec):
        made = open_source(spec)
    elif weights is None:
        raise SynthkdError(
            f"{spec!r} is not a model directory or source ({source_usages()}); a model given by code needs its "
            "weights (--teacher-weights/--weights FILE) and input format (--input-shape C,H,W --mean M --std S)"
        )
    else:
        made = SourceModel(build_network(spec, {}), spec, {})
    if weights is not None:
        load_weights(made.net, weights)
    input_shape = input_shape or made.input_shape
    if input_shape is None:
        raise SynthkdError(f"{spec} does not say what input it expects; give --input-shape C,H,W (and --mean, --std)")
    if len(input_shape) != 3:
        raise SynthkdError(f"--input-shape must be C,H,W, got {tuple(input_shape)}")
    fmt = InputFormat(*input_shape, mean=tuple(mean or made.mean or (0.0,)), std=tuple(std or made.std or (1.0,)))
    classes = count_classes(made.net.eval(), fmt, spec)
    names = made.class_names if made.class_names and len(made.class_names) == classes else [str(i) for i in range(classes)]
    return Classifier(made.net, ModelConfig(arch=made.arch, arch_kwargs=made.arch_kwargs, input=fmt, class_names=names))


def count_classes(net: torch.nn.Module, fmt: InputFormat, spec: str) -> int:
    """The number of classes ``net`` predicts on two blank images, or a one-line error where its
    output is no N x classes tensor (e.g. a transformers model given as a factory)."""
    with torch.no_grad():
        logits = net(fmt.normalize(torch.zeros(2, *fmt.shape)))
    if not isinstance(logits, torch.Tensor):
        hint = "; name a transformers model as hf:DIR" if hasattr(logits, "logits") else ""
        raise SynthkdError(f"{spec} returns a {type(logits).__name__}, not a tensor of logits{hint}")
    if logits.ndim != 2:
        raise SynthkdError(f"{spec} returns a tensor of shape {tuple(logits.shape)}; a classifier returns N x classes")
    return int(logits.shape[1])


def model_source_problem(spec: str, zoo: bool = False) -> str | None:
    """Why ``spec`` cannot name a model (a model directory, a model source, FILE.py:factory,
    module:factory, and with ``zoo`` a zoo architecture), or None; a module or library is only
    imported when the model is built."""
    if zoo:
        try:
            if parse_zoo_spec(spec) is not None:
                return None
        except SynthkdError as error:
            return str(error)
    if Path(spec).is_dir():
        return None
    if is_source_spec(spec):
        return source_problem(spec)
    module_or_file, sep, _ = spec.rpartition(":")
    if sep and module_or_file.endswith(".py"):
        return None if Path(module_or_file).is_file() else f"no file {module_or_file}"
    if sep:
        return None
    what = "a zoo architecture, " if zoo else ""
    return f"{spec!r} is neither {what}a model directory, a model source ({source_usages()}) nor FILE.py:factory"
