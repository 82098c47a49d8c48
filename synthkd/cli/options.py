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


def _option(spec: dataclasses.Field, hint: Any, help_prefix: str, default: Any) -> Callable:
    """One click option for one field (booleans become ``--x/--no-x``)."""
    flag = flag_of(spec)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    bare = next((h for h in typing.get_args(hint) if h is not type(None)), hint) if optional else hint
    help_text = help_prefix + spec.metadata.get("help", "")
    kwargs: dict[str, Any] = {"default": default, "help": help_text, "show_default": default is not None}
    if bare is bool:
        return click.option(f"{flag}/--no-{flag.removeprefix('--')}", spec.name, **kwargs)
    names = choices_of(spec)
    if names is None and typing.get_origin(bare) is Literal:  # a string annotation (postponed evaluation)
        names = [str(v) for v in typing.get_args(bare)]
    if typing.get_origin(bare) is Literal and names is not None:
        kwargs["type"] = click.Choice(names)
    elif typing.get_origin(bare) in (list, tuple):
        item = typing.get_args(bare)[0]
        kwargs.update(multiple=True, type=item if item in (int, float, str) else str,
                      default=tuple(default or ()), show_default=bool(default))
    elif bare in (int, float, str):
        kwargs["type"] = bare
    if names is not None and not isinstance(kwargs.get("type"), click.Choice):
        kwargs["help"] += f" One of: {', '.join(names)}."  # a registry's names, checked when the command runs
    return click.option(flag, spec.name, **kwargs)


def cli_fields(cls: type, only: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> list[dataclasses.Field]:
    """The fields of ``cls`` that the command line exposes, in declaration order."""
    return [spec for spec in dataclasses.fields(cls)
            if spec.metadata.get("cli", True) and "help" in spec.metadata and spec.name not in exclude
            and (only is None or spec.name in only)]


def settings_options(cls: type, name: str, *, only: tuple[str, ...] | None = None, exclude: tuple[str, ...] = (),
                     defaults: dict[str, Any] | None = None, help_prefix: str = "") -> Callable:
    """Decorator: an option for every command-line field of the settings class ``cls``; the
    command receives them as one checked instance in the argument ``name`` (fields left out keep
    their dataclass defaults, or ``defaults``). Problems are reported under the flags' names."""
    hints = typing.get_type_hints(cls)
    specs = cli_fields(cls, only, exclude)
    defaults = defaults or {}

    def default_of(spec: dataclasses.Field) -> Any:
        if spec.name in defaults:
            return defaults[spec.name]
        if spec.default is not dataclasses.MISSING:
            return spec.default
        if spec.default_factory is not dataclasses.MISSING:
            return spec.default_factory()
        return None

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = {spec.name: kwargs.pop(spec.name) for spec in specs}
            for spec in specs:
                if isinstance(values[spec.name], tuple) and typing.get_origin(hints[spec.name]) is list:
                    values[spec.name] = list(values[spec.name])
            settings = cls(**{**{k: v for k, v in defaults.items() if k not in values}, **values})
            check_cli(settings)
            kwargs[name] = settings
            return function(*args, **kwargs)

        for spec in reversed(specs):
            command = _option(spec, hints[spec.name], help_prefix, default_of(spec))(command)
        return command

    return decorate


def check_cli(settings: Settings) -> None:
    """``settings.check()`` with each problem named by its flag (``--steps-per-batch must be ...``)."""
    flags = {spec.name: flag_of(spec) for spec in dataclasses.fields(settings)}  # type: ignore[arg-type]

    def name_of(path: str) -> str:
        head, _, rest = path.partition(".")
        if rest and isinstance(getattr(settings, head, None), Settings):
            nested = getattr(settings, head)
            return {spec.name: flag_of(spec) for spec in dataclasses.fields(nested)}.get(rest, rest)
        return flags.get(path, path)

    settings.check(name_of)
