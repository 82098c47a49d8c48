"""The generation methods by name: what ``synthkd generate --method`` and ``generate.method`` of
``synthkd run`` accept.

A method is one module that registers a :class:`GeneratorEntry` under its name. Its settings
class (if any) becomes ``generate.<method>:`` in a run config and ``--method-option KEY=VALUE``
on the command line (the built-in sections, ``fast``, ``diffusion`` and ``activations``, are
fields of the generate settings with options of their own). The built-in modules are imported on
first use, by name, so registering needs no import of this package's other modules.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from synthkd.registry import Registry
from synthkd.settings import Settings

BUILT_IN = ("inversion", "fast", "diffusion", "activations")


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
    files: Callable[[Any], list[str]] = lambda section: []  # local files or directories it reads (a run reruns it when they change)
    output: Literal["images", "activations"] = "images"


def _load_built_in() -> None:
    for name in BUILT_IN:
        importlib.import_module(f"{__package__}.{name}")


GENERATORS: Registry[GeneratorEntry] = Registry(
    "generation method", loader=_load_built_in, hint="or register one: README, Adding a generator")


def method_names() -> list[str]:
    """The registered methods, the built-ins first in their usual order."""
    return sorted(GENERATORS.names(), key=lambda name: BUILT_IN.index(name) if name in BUILT_IN else len(BUILT_IN))


def method_help() -> str:
    """``--method``'s help: every listed method with its one line."""
    return "; ".join(f"{name}: {GENERATORS.get(name).summary}" for name in method_names())
