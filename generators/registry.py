"""The generation methods by name: what ``synthkd generate --method`` and ``generate.method`` of
``synthkd run`` accept.

A method is one module that registers a :class:`GeneratorEntry` under its name. Its settings
class (if any) becomes ``generate.<method>:`` in a run config and ``--method-option KEY=VALUE``
on the command line (the built-in sections, ``fast``, ``diffusion`` and ``activations``, are
fields of the generate settings with options of their own). Every module of this package is
imported on first use (found on disk, so a new built-in method is its module alone), and this
module imports none of them by name: they import it to register, with no cycle.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from synthkd.registry import Registry
from synthkd.settings import Settings

DEFAULT_METHOD = "inversion"


@dataclass(frozen=True)
class GeneratorEntry:
    """How a method is built and what it depends on.

    ``build(settings, teacher, competitor, seed)`` gets the generate settings (``settings.section()``
    is the method's own section), the teacher on its device, an optional competitor (a student the
    images should make disagree with the teacher; None without one) and the run's seed, and returns
    a :class:`~.base.SyntheticImageGenerator` (or, for ``output="activations"``, an
    :class:`~.activations.ActivationSynthesizer`)."""

    build: Callable[..., Any]
    summary: str  # one line for ``--method``'s help
    settings: type[Settings] | None = None  # its section: generate.<method> / --method-option
    reads: tuple[str, ...] = ()  # top-level generate settings it uses (iterations, lr, loss weights)
    required: dict[str, str] = field(default_factory=dict)  # fields of its section it needs, and why
    # Local files or directories its section reads: a run reruns the method when they change.
    files: Callable[[Any], list[str]] = lambda section: []
    output: Literal["images", "activations"] = "images"
    # The boundary techniques (generators/boundary.py) the method takes; the others are refused.
    techniques: tuple[str, ...] = ()


def _load_built_in() -> None:
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{__package__}.{module.name}")


GENERATORS: Registry[GeneratorEntry] = Registry(
    "generation method", loader=_load_built_in, hint="or register one: README, Architecture")


def method_names() -> list[str]:
    """The registered methods, the default first, then in the order they registered."""
    return sorted(GENERATORS.names(), key=lambda name: name != DEFAULT_METHOD)


def method_help() -> str:
    """``--method``'s help: every listed method with its one line."""
    return "; ".join(f"{name}: {GENERATORS.get(name).summary}" for name in method_names())
