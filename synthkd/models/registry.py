"""The model zoo: architectures by name, each a factory taking width, in_channels, num_classes.

A new architecture is one module whose factory carries ``@register_model("name")`` (imported by
``synthkd.models``); ``synthkd models``, ``--arch`` and the run schema read :data:`MODELS`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

from ..errors import SynthkdError
from ..registry import Registry
from ..settings import read_value

MODELS: Registry[Callable[..., nn.Module]] = Registry(
    "architecture", hint="or pass your own model as path/to/file.py:factory or package.module:factory")

# ``listed=False`` for architectures that saved models name but nobody picks as a student
# (e.g. a searched student's chain).
register_model = MODELS.register
list_models = MODELS.names


def is_registered(name: str) -> bool:
    return name in MODELS


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a zoo architecture, e.g. ``create_model("resnet20", width=0.5, in_channels=1)``."""
    return MODELS.get(name)(**kwargs)


ZOO_SPEC_GRAMMAR = ("NAME[:KEY=VALUE,...] — a zoo architecture with arguments, e.g. resnet20:inner=0.5 (thinner "
                    "inside each block, the teacher's width at every cut), resnet20:blocks=1,width=0.5")


def parse_zoo_spec(spec: str) -> tuple[str, dict[str, Any]] | None:
    """``resnet20:inner=0.5,blocks=1`` -> ("resnet20", {"inner": 0.5, "blocks": 1}); None when
    ``spec`` does not start with a zoo name (a directory or FILE.py:factory)."""
    name, _, arguments = spec.partition(":")
    if name not in MODELS or (arguments and "=" not in arguments):
        return None
    return name, spec_arguments(arguments, spec)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What the arguments every spec shares must be (an architecture checks the others itself).
SPEC_VALUES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "width": (lambda v: _number(v) and v > 0, "a positive number"),
    "inner": (lambda v: _number(v) and v > 0, "a positive number"),
    "blocks": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive whole number"),
    "sparsity": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
}


def spec_arguments(arguments: str, spec: str) -> dict[str, Any]:
    """``inner=0.5,blocks=1`` -> {"inner": 0.5, "blocks": 1}, values read as YAML and the shared
    ones checked (:data:`SPEC_VALUES`); ``spec`` (the whole spec) names where a bad part was."""
    kwargs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in arguments.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise SynthkdError(f"cannot read {part!r} in {spec!r}; write {ZOO_SPEC_GRAMMAR}")
        kwargs[key] = read_value(value.strip())
        valid, what = SPEC_VALUES.get(key, (lambda v: True, ""))
        if not valid(kwargs[key]):
            raise SynthkdError(f"{part!r} in {spec!r}: {key} must be {what}")
    return kwargs
