"""Settings dataclasses: the one place a component's setting, its default, its check and its help live.

A component (the inversion objective, the fast generator, a diffusion sampler, distillation, the
detector, ...) declares its settings as a dataclass deriving :class:`Settings`, each field made by
:func:`setting`. Everything else is derived from it: the click options of the commands that take
it (``synthkd.cli.options``), the YAML section of ``synthkd run`` (built with :meth:`from_mapping`),
and the validation both use (:meth:`Settings.problems`). A field's name is its YAML key, and its
flag is ``--field-name`` unless ``flag`` says otherwise, so one name means one thing everywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import MISSING, asdict, fields, is_dataclass
from typing import Any, Callable, Collection, Literal

from .errors import SynthkdError

Check = Callable[[Any], "str | None"]


def setting(
    default: Any = MISSING,
    *,
    help: str,
    default_factory: Callable[[], Any] | Any = MISSING,
    flag: str | None = None,
    positive: bool = False,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    choices: Collection[str] | Callable[[], Collection[str]] | None = None,
    check: Check | None = None,
    cli: bool = True,
) -> Any:
    """A settings field. ``help`` is the option's help text (and the schema's documentation);
    ``positive``/``at_least``/``above``/``at_most``/``below`` bound a number; ``choices`` is a
    collection of names or a callable returning them (a registry's ``names``); ``check`` returns a
    problem (a phrase such as "must be a fraction") or None; ``cli=False`` keeps a field out of
    the command line (a YAML-only setting); ``flag`` renames the option where ``--field-name``
    would mean something else on a command."""
    metadata = {"help": help, "flag": flag, "positive": positive, "at_least": at_least, "above": above,
                "at_most": at_most, "below": below, "choices": choices, "check": check, "cli": cli}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def shared_setting(owner: type, name: str) -> Any:
    """The field ``name`` of the settings class ``owner`` again, for a class that passes it on
    (default, bounds and help stay written once, where the setting is used)."""
    spec = owner.__dataclass_fields__[name]
    return dataclasses.field(default=spec.default, default_factory=spec.default_factory, metadata=spec.metadata)


def refusal(read: Callable[[Any], Any]) -> Check:
    """A field check from a function that reads a value and raises :class:`SynthkdError` where it
    cannot (a dataset spec, a budget, a class table): its message is the problem."""

    def check(value: Any) -> str | None:
        try:
            read(value)
        except SynthkdError as error:
            return str(error)
        return None

    return check


def directory_problem(path: str) -> str | None:
    """A check of a directory setting: refused where the path is something other than a directory."""
    return f"{path} is a file, not a directory; give a directory" if os.path.lexists(path) and not os.path.isdir(path) \
        else None


def choices_of(spec: dataclasses.Field) -> list[str] | None:
    """The names a field accepts: its ``choices`` (called if a callable), or its Literal's values."""
    choices = spec.metadata.get("choices")
    if callable(choices):
        return list(choices())
    if choices is not None:
        return list(choices)
    hint = _bare(spec.type if not isinstance(spec.type, str) else None)
    if typing.get_origin(hint) is Literal:
        return [str(v) for v in typing.get_args(hint)]
    return None


def _bare(hint: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        return options[0] if len(options) == 1 else hint
    return hint


class Settings:
    """Base of every settings dataclass: validation with problems named by field path, and
    construction from a YAML mapping with every problem collected at once."""

    def cross_problems(self) -> list[tuple[str, str]]:
        """Rules across fields, as (field path, problem); override where a component has them."""
        return []

    def problems(self, prefix: str = "") -> list[tuple[str, str]]:
        """Every problem of these settings and their nested sections, as (dotted path, phrase)."""
        found: list[tuple[str, str]] = []
        for spec in fields(self):  # type: ignore[arg-type]
            value = getattr(self, spec.name)
            path = f"{prefix}{spec.name}"
            if isinstance(value, Settings):
                found += value.problems(f"{path}.")
                continue
            problem = field_problem(spec, value)
            if problem:
                found.append((path, problem))
        found += [(f"{prefix}{name}", problem) for name, problem in self.cross_problems()]
        return found

    def check(self, name_of: Callable[[str], str] = lambda path: path) -> None:
        """Raise one :class:`SynthkdError` naming every problem (``name_of`` turns a field path
        into what the user typed: a flag on the command line, a YAML key in a run config)."""
        found = self.problems()
        if found:
            raise SynthkdError("; ".join(f"{name_of(path)} {problem}" for path, problem in found))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_mapping(cls, raw: Any, prefix: str = "", errors: list[str] | None = None) -> Any:
        """Build from a mapping (a YAML section): unknown keys (with a close match suggested),
        wrong types and failed checks are appended to ``errors`` as ``path: problem``; returns
        None where the section itself is not a mapping."""
        errors = [] if errors is None else errors
        built = build(cls, raw, prefix, errors)
        if built is not None:
            errors += [f"{prefix}{path}: {problem}" for path, problem in built.cross_problems()]
        return built


def field_problem(spec: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with ``value`` for the field ``spec`` (bounds, choices, its own check), or None."""
    meta = spec.metadata
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("positive") and value <= 0:
            return f"must be positive, got {show(value)}"
        if meta.get("at_least") is not None and value < meta["at_least"]:
            return f"must be at least {meta['at_least']}, got {show(value)}"
        if meta.get("above") is not None and value <= meta["above"]:
            return f"must be above {meta['above']}, got {show(value)}"
        if meta.get("at_most") is not None and value > meta["at_most"]:
            return f"must be at most {meta['at_most']}, got {show(value)}"
        if meta.get("below") is not None and value >= meta["below"]:
            return f"must be below {meta['below']}, got {show(value)}"
    names = choices_of(spec) if meta.get("choices") is not None else None
    if names is not None:
        values = value if isinstance(value, list) else [value]
        for item in values:
            if item not in names:
                return f"expected one of {', '.join(names)}, got {show(item)}"
    if meta.get("check"):
        return meta["check"](value)
    return None


# ---------------------------------------------------------------------------------------------
# Building from a mapping (YAML), with types from the annotations


def build(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or '(top level)'}: expected a section (mapping), got {show(raw)}")
        return None
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(known)}"
            errors.append(f"{prefix}{key}: unknown key{hint}")
    values = {}
    for name, spec in known.items():
        if name not in raw:
            continue
        path = f"{prefix}{name}"
        hint = hints[name]
        if is_dataclass(hint):
            nested = hint.from_mapping(raw[name], f"{path}.", errors) if issubclass(hint, Settings) \
                else build(hint, raw[name], f"{path}.", errors)
            if nested is not None:
                values[name] = nested
            continue
        ok, value = convert(raw[name], hint)
        if not ok:
            errors.append(f"{path}: expected {describe(hint)}, got {show(raw[name])}")
            continue
        problem = field_problem(spec, value)
        if problem:
            errors.append(f"{path}: {problem}")
        values[name] = value  # well typed: kept, so rules across fields do not report it missing
    return cls(**values)


def convert(value: Any, hint: Any) -> tuple[bool, Any]:
    """(True, value as ``hint``) where ``value`` is one, else (False, None); ints pass as floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, converted = convert(value, option)
            if ok:
                return True, converted
        return False, None
    if origin is Literal:
        return value in typing.get_args(hint), value
    if origin in (list, tuple):
        if not isinstance(value, list):
            return False, None
        item = typing.get_args(hint)[0]
        converted = [convert(v, item) for v in value]
        return all(ok for ok, _ in converted), [v for _, v in converted]
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number, float(value) if number else None
    if hint is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported settings type {hint}")


def describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(option) for option in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(v) for v in typing.get_args(hint))
    if origin in (list, tuple):
        return f"a list of {describe(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    if hint is Any:
        return "any value"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}[hint]


# The most values one YAML document may stand for, aliases (``*NAME``) expanded: a dozen lines of
# nested aliases otherwise stand for billions, which every later copy or message would expand.
YAML_VALUES = 100_000


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)``, refused with a :class:`SynthkdError` naming ``where`` when its
    aliases expand to more than :data:`YAML_VALUES` values, refer to themselves, or it nests deeper
    than Python recurses; other malformed YAML raises ``yaml.YAMLError``."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        def compose_document(self):
            node = super().compose_document()
            _expanded_size(node, {}, set(), where)
            return node

    try:
        return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 (a SafeLoader)
    except RecursionError:
        raise SynthkdError(f"{where} nests too deeply to read; write it with fewer nested levels") from None


def _expanded_size(node: Any, sizes: dict[int, int], open_nodes: set[int], where: str) -> int:
    """Values ``node`` stands for with every alias expanded, counted once per distinct node."""
    import yaml

    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise SynthkdError(f"{where} has an alias inside the value it names (a structure that contains itself); "
                           "write the values out")
    open_nodes.add(key)
    children = (node.value if isinstance(node, yaml.SequenceNode)
                else [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else [])
    size = 1
    for child in children:
        size += _expanded_size(child, sizes, open_nodes, where)
        if size > YAML_VALUES:
            raise SynthkdError(f"{where} stands for more than {YAML_VALUES:,} values once its aliases (*NAME) are "
                               "expanded; write a config of ordinary size")
    open_nodes.discard(key)
    sizes[key] = size
    return size


def read_value(text: str) -> Any:
    """A value typed on the command line (``KEY=VALUE`` overrides, ``--method-option``) as YAML
    reads it (``0.5``, ``true``, ``[1, 2]``), or the text itself where it is not YAML."""
    import yaml

    try:
        return load_yaml(text, f"the value {text[:40]!r}")
    except yaml.YAMLError:
        return text


SHOWN_CHARACTERS = 200  # of a value quoted in a message


def show(value: Any) -> str:
    """``value`` as JSON for a message, at most :data:`SHOWN_CHARACTERS` long."""
    text = json.dumps(value, default=str)
    return text if len(text) <= SHOWN_CHARACTERS else text[: SHOWN_CHARACTERS - 3] + "..."
