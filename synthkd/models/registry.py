"""The model zoo: architectures by name, each a factory taking width, in_channels, num_classes."""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import SynthkdError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_UNLISTED: set[str] = set()


def register_model(name: str, listed: bool = True):
    """Decorator adding a factory to the zoo under ``name``; ``listed=False`` for architectures
    that saved models name but nobody picks as a student (e.g. a searched student's chain)."""

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = factory
        if not listed:
            _UNLISTED.add(name)
        return factory

    return decorate


def list_models() -> list[str]:
    return sorted(set(_REGISTRY) - _UNLISTED)


def is_registered(name: str) -> bool:
    return name in _REGISTRY


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a zoo architecture, e.g. ``create_model("resnet20", width=0.5, in_channels=1)``."""
    if name not in _REGISTRY:
        raise SynthkdError(
            f"unknown architecture {name!r}; the zoo has {', '.join(list_models())} "
            "(or pass your own model as path/to/file.py:factory or package.module:factory)"
        )
    return _REGISTRY[name](**kwargs)
