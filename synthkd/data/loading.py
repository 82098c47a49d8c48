"""How data loaders read: the worker processes that decode items beside training or evaluation.

A process-wide choice (commands set it from ``--num-workers``, Python callers with
:func:`use_loader_settings`): it changes how fast items arrive, never which items or in what order,
so it is no part of a run's settings or of what a resumed run must agree with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..settings import Settings, setting


@dataclass
class LoaderSettings(Settings):
    num_workers: int = setting(0, at_least=0, help="Worker processes that read and decode data beside the main one "
                                                   "(0: read in the main process); worth it for image files.")


_CURRENT = LoaderSettings()


def use_loader_settings(settings: LoaderSettings) -> None:
    global _CURRENT
    settings.check()
    _CURRENT = settings


def loader_options() -> dict[str, Any]:
    """Keyword arguments for a DataLoader of real data, from the current :class:`LoaderSettings`."""
    return {"num_workers": _CURRENT.num_workers}
