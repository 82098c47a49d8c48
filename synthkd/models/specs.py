"""The model spec grammar shown by ``-h`` (``--teacher``, ``--student``, ``--model``), kept in one
place: a new way to name a model adds its row here (or, for a registry of sources, its rows are
appended from that registry in :func:`model_spec_help`)."""

from __future__ import annotations

MODEL_SPEC_FORMS: tuple[tuple[str, str], ...] = (
    ("DIR", "a model directory written by synthkd (config.json + model.safetensors): carries its weights, "
            "input format and class names"),
    ("ARCH", "a zoo architecture (see `synthkd models`), for a student: --student resnet8"),
    ("FILE.py:FACTORY", "a function in a Python file returning an nn.Module, with --weights / --teacher-weights "
                        "FILE and --input-shape C,H,W (--mean, --std)"),
    ("package.module:FACTORY", "the same, from an importable module"),
)


def model_spec_help() -> list[tuple[str, str]]:
    """(form, meaning) rows of every way to name a model: the fixed forms, then the model sources."""
    from .sources import SOURCES

    return list(MODEL_SPEC_FORMS) + [(SOURCES.get(name).usage, SOURCES.get(name).description) for name in SOURCES.names()]
