"""One small registry per role (models, generators, densities, datasets, attacks, losses).

A new part is one module that registers itself; every listing, ``--choice`` and schema check
reads the registry, so nothing else needs to learn its name (the torchdistill way).
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import SynthkdError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one role. ``register`` is a decorator; ``get`` names the known entries
    when a name is unknown, so a typo gets a one-line fix. ``loader`` (optional) imports the
    modules that register the built-in entries, on first use, so listing them never imports a
    heavy dependency early and the core never imports a layer above it at module load."""

    def __init__(self, role: str, loader: Callable[[], None] | None = None, hint: str = ""):
        self.role = role
        self.hint = hint
        self._entries: dict[str, T] = {}
        self._unlisted: set[str] = set()
        self._loader = loader

    def register(self, name: str, *, listed: bool = True, replace: bool = False) -> Callable[[T], T]:
        """Decorator adding ``entry`` under ``name``; ``listed=False`` keeps it out of listings and
        choices (parts that saved files name but nobody picks by hand)."""

        def decorate(entry: T) -> T:
            if name in self._entries and not replace and self._entries[name] is not entry:
                raise SynthkdError(f"a {self.role} named {name!r} is already registered; pick another name")
            self._entries[name] = entry
            if not listed:
                self._unlisted.add(name)
            return entry

        return decorate

    def add(self, name: str, entry: T, *, listed: bool = True, replace: bool = False) -> T:
        return self.register(name, listed=listed, replace=replace)(entry)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)
        self._unlisted.discard(name)

    def _load(self) -> None:
        if self._loader is not None:
            loader, self._loader = self._loader, None
            loader()

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            hint = f" ({self.hint})" if self.hint else ""
            raise SynthkdError(f"unknown {self.role} {name!r}; use one of {', '.join(self.names())}{hint}")
        return self._entries[name]

    def names(self) -> list[str]:
        """The listed names, in registration order (the built-ins first)."""
        self._load()
        return [name for name in self._entries if name not in self._unlisted]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
