"""Click options derived from settings dataclasses, so a default, a check and a help text are
written once (in the component's settings) and every command that takes them agrees."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Callable, Literal

import click

from ..settings import Settings, choices_of


def flag_of(spec: dataclasses.Field) -> str:
    return spec.metadata.get("flag") or "--" + spec.name.replace("_", "-")


def _option(spec: dataclasses.Field, hint: Any, help_prefix: str, default: Any, dest: str) -> Callable:
    """One click option for one field (booleans become ``--x/--no-x``), passed as ``dest``."""
    flag = flag_of(spec)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    bare = next((h for h in typing.get_args(hint) if h is not type(None)), hint) if optional else hint
    help_text = help_prefix + spec.metadata.get("help", "")
    kwargs: dict[str, Any] = {"default": default, "help": help_text, "show_default": default is not None}
    if bare is bool:
        return click.option(f"{flag}/--no-{flag.removeprefix('--')}", dest, **kwargs)
    names = choices_of(spec)
    if names is None and typing.get_origin(bare) is Literal:  # a string annotation (postponed evaluation)
        names = [str(v) for v in typing.get_args(bare)]
    if typing.get_origin(bare) is Literal and names is not None:
        kwargs["type"] = click.Choice(names)
    elif typing.get_origin(bare) in (list, tuple):
        kwargs.update(type=CommaList(typing.get_args(bare)[0]), show_default=bool(default),
                      default=None if default is None else ",".join(map(str, default)), help="Comma-separated. " + help_text)
    elif bare in (int, float, str):
        kwargs["type"] = bare
    if names is not None and not isinstance(kwargs.get("type"), click.Choice):
        kwargs["help"] += f" One of: {', '.join(names)}."  # a registry's names, checked when the command runs
    return click.option(flag, dest, **kwargs)


class CommaList(click.ParamType):
    """``a,b,c`` as a list of ``item`` (int, float or str): how users type several values at once
    (``--attacks fgsm,pgd``, ``--block-out-channels 16,32,64``)."""

    name = "list"

    def __init__(self, item: type):
        self.item = item if item in (int, float, str) else str

    def convert(self, value: Any, param: Any, ctx: Any) -> list[Any]:
        if isinstance(value, list):
            return value
        try:
            return [self.item(part.strip()) for part in str(value).split(",") if part.strip()]
        except ValueError:
            self.fail(f"expected comma-separated {self.item.__name__} values, got {value!r}", param, ctx)


def cli_fields(cls: type, only: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> list[dataclasses.Field]:
    """The fields of ``cls`` that the command line exposes, in declaration order."""
    return [spec for spec in dataclasses.fields(cls)
            if spec.metadata.get("cli", True) and "help" in spec.metadata and spec.name not in exclude
            and (only is None or spec.name in only)]


def flattened(cls: type, only: tuple[str, ...] | None = None, exclude: tuple[str, ...] = (),
              prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted path, field, type) of every command-line field of ``cls``; a field holding a nested
    settings section contributes that section's fields, as options of the same command."""
    hints = typing.get_type_hints(cls)
    found: list[tuple[str, dataclasses.Field, Any]] = []
    for spec in cli_fields(cls, only, exclude):
        hint = hints[spec.name]
        if isinstance(hint, type) and issubclass(hint, Settings):
            found += flattened(hint, prefix=f"{prefix}{spec.name}.")
        else:
            found.append((prefix + spec.name, spec, hint))
    return found


def assemble(cls: type, values: dict[str, Any]) -> Any:
    """An instance of ``cls`` from values by dotted path (nested sections built from theirs)."""
    hints = typing.get_type_hints(cls)
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = _as_annotated(value, hints[head])
    top.update({head: assemble(hints[head], inner) for head, inner in nested.items()})
    return cls(**top)


def _as_annotated(value: Any, hint: Any) -> Any:
    """A list option's value as the field's container (a tuple field keeps a tuple), None as None."""
    container = typing.get_origin(next((h for h in typing.get_args(hint) if h is not type(None)), hint))
    if value is None or container not in (list, tuple) or not isinstance(value, (list, tuple)):
        return value
    return container(value)


def declared_by(cls: type, path: str) -> type:
    """The settings class that declares the field at dotted ``path`` of ``cls`` (a base class for
    an inherited field, the section's class for a nested one)."""
    head, _, rest = path.partition(".")
    if rest:
        return declared_by(typing.get_type_hints(cls)[head], rest)
    return next(c for c in reversed(cls.__mro__) if head in c.__dict__.get("__annotations__", {}))


def group_of(cls: type, path: str, groups: dict[type | str, str]) -> str | None:
    """The help section of the field at ``path``: ``groups`` keyed by the path, by a section's path
    (``fast``), or by the class that declares the field."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in groups:
            return groups[".".join(parts[:end])]
    return groups.get(declared_by(cls, path))


def settings_options(cls: type, name: str, *, only: tuple[str, ...] | None = None, exclude: tuple[str, ...] = (),
                     defaults: dict[str, Any] | None = None, help_prefix: str = "",
                     groups: dict[type | str, str] | None = None) -> Callable:
    """Decorator: an option for every command-line field of the settings class ``cls`` (and of its
    nested sections); the command receives them as one checked instance in the argument ``name``
    (fields left out keep their dataclass defaults, or ``defaults``, keyed by dotted path).
    Problems are reported under the flags' names. ``groups`` puts options under headed sections
    of ``-h`` (see :func:`group_of`)."""
    specs = flattened(cls, only, exclude)
    defaults = defaults or {}
    groups = groups or {}

    def default_of(path: str, spec: dataclasses.Field) -> Any:
        if path in defaults:
            return defaults[path]
        if spec.default is not dataclasses.MISSING:
            return spec.default
        if spec.default_factory is not dataclasses.MISSING:
            return spec.default_factory()
        return None

    def dest(path: str) -> str:
        return path.replace(".", "__")

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = {path: kwargs.pop(dest(path)) for path, _, _ in specs}
            settings = assemble(cls, {**{k: v for k, v in defaults.items() if k not in values}, **values})
            check_cli(settings)
            kwargs[name] = settings
            return function(*args, **kwargs)

        for path, spec, hint in reversed(specs):
            command = _option(spec, hint, help_prefix, default_of(path, spec), dest(path))(command)
            title = group_of(cls, path, groups)
            if title:
                command.__click_params__[-1].help_group = title  # type: ignore[attr-defined]
        return command

    return decorate


def check_cli(settings: Settings) -> None:
    """``settings.check()`` with each problem named by its flag (``--steps-per-batch must be ...``)."""
    flags = {path: flag_of(spec) for path, spec, _ in flattened(type(settings))}
    settings.check(lambda path: flags.get(path, path))
