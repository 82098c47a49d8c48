"""The model zoo: architectures by name, each a factory taking width, in_channels, num_classes.

A new architecture is one module whose factory carries ``@register_model("name")`` (imported by
``synthkd.models``); ``synthkd models``, ``--arch`` and the run schema read :data:`MODELS`.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..registry import Registry

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
