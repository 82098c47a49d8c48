"""Models: the zoo, the :class:`Classifier` wrapper and loading of saved or user models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ..errors import SynthkdError
from . import chain, resnet, thinning  # noqa: F401  (registers the zoo)
from .classifier import (Classifier, InputFormat, ModelConfig, arch_needs_trust, build_network, import_factory, load_weights,
                         trusting_code, unwrap, weights_fingerprint)
from .registry import MODELS, create_model, is_registered, list_models, parse_zoo_spec, register_model

__all__ = [
    "MODELS", "Classifier", "InputFormat", "ModelConfig", "arch_needs_trust", "create_model", "import_factory", "is_registered",
    "list_models", "load_model", "model_source_problem",
    "register_model", "trusting_code", "unwrap", "weights_fingerprint",
]


def load_model(
    spec: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    input_shape: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Classifier:
    """Load a saved model directory, or build ``FILE.py:factory`` / ``module:factory`` / a zoo
    name with its weights and input format. The number of classes is read from the output."""
    path = Path(spec)
    if path.is_dir():
        if weights is not None:
            raise SynthkdError(f"{spec} is a model directory; it carries its own weights, drop --weights")
        return Classifier.from_pretrained(path)
    spec = str(spec)
    if weights is None or input_shape is None:
        raise SynthkdError(
            f"{spec!r} is not a model directory; a model given by code needs its weights "
            "(--teacher-weights/--weights FILE) and input format (--input-shape C,H,W --mean M --std S)"
        )
    if len(input_shape) != 3:
        raise SynthkdError(f"--input-shape must be C,H,W, got {tuple(input_shape)}")
    net = build_network(spec, {})
    load_weights(net, weights)
    fmt = InputFormat(*input_shape, mean=tuple(mean or (0.0,)), std=tuple(std or (1.0,)))
    net.eval()
    with torch.no_grad():
        logits = net(fmt.normalize(torch.zeros(2, *fmt.shape)))
    if logits.ndim != 2:
        raise SynthkdError(f"{spec} returns a tensor of shape {tuple(logits.shape)}; a classifier returns N x classes")
    names = [str(i) for i in range(logits.shape[1])]
    return Classifier(net, ModelConfig(arch=spec, input=fmt, class_names=names))


def model_source_problem(spec: str, zoo: bool = False) -> str | None:
    """Why ``spec`` cannot name a model (a model directory, FILE.py:factory, module:factory, and
    with ``zoo`` a zoo architecture), or None; a module is only imported when the model is built."""
    if zoo:
        try:
            if parse_zoo_spec(spec) is not None:
                return None
        except SynthkdError as error:
            return str(error)
    if Path(spec).is_dir():
        return None
    module_or_file, sep, _ = spec.rpartition(":")
    if sep and module_or_file.endswith(".py"):
        return None if Path(module_or_file).is_file() else f"no file {module_or_file}"
    if sep:
        return None
    what = "a zoo architecture, " if zoo else ""
    return f"{spec!r} is neither {what}a model directory nor FILE.py:factory"
