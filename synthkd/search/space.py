"""Candidate spaces: which student pieces each neighbourhood may choose from.

A candidate is a whole student *network* (an architecture and its arguments, optionally pruned);
split at the teacher's cuts, its k-th piece is a candidate for neighbourhood k. One candidate
thus offers a piece to every neighbourhood, and the search may combine the stem of one with the
stages of others. Pieces that come out the same for several candidates (the stem does not
depend on the number of blocks per stage) are trained once.

``--candidates`` takes either a grid over the teacher's own zoo architecture::

    inner=0.25,0.5,0.75,1.0;depth=1,2;sparsity=0.5

(``inner``: the blocks' middle channels, so every candidate keeps the teacher's interfaces, any
combination merges without adapters and each starts from the teacher's strongest channels;
``width``: multipliers of the teacher's width, joined by 1x1 adapters where they differ; ``depth``: residual blocks per stage, which
needs stage-level cuts; ``sparsity``: besides every dense candidate, one pruned to that fraction
of its convolution and linear weights), or ``FILE.py:factory`` / ``package.module:factory``, a
function of the teacher :class:`~synthkd.models.Classifier` returning :class:`Candidate` objects
(or dicts with their fields).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import product
from typing import Any

from ..errors import SynthkdError
from ..models import Classifier, import_factory, is_registered

DEFAULT_CANDIDATES = "inner=0.25,0.5,0.75,1.0"
GRID_KEYS = ("inner", "width", "depth", "sparsity")


@dataclass
class Candidate:
    name: str
    arch: str
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    sparsity: float = 0.0  # fraction of each conv/linear weight pruned by magnitude, then re-distilled

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise SynthkdError(f"candidate {self.name!r}: sparsity must be in [0, 1), got {self.sparsity}")

    @property
    def network(self) -> str:
        """Identifies the network; a pruned candidate starts from the dense one of the same network."""
        return json.dumps([self.arch, self.arch_kwargs], sort_keys=True)

    def spec(self) -> dict[str, Any]:
        return {"arch": self.arch, "arch_kwargs": self.arch_kwargs, "sparsity": self.sparsity}


def candidate_space(spec: str, teacher: Classifier) -> list[Candidate]:
    """The candidates of ``spec`` (a grid or a factory); every pruned one's dense parent included."""
    if "=" not in spec and ":" in spec:
        candidates = _from_factory(spec, teacher)
    else:
        candidates = _from_grid(spec, teacher)
    if not candidates:
        raise SynthkdError(f"the candidate space {spec!r} is empty")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise SynthkdError(f"candidate names must be unique in {spec!r}: {names}")
    dense = {c.network for c in candidates if not c.sparsity}
    for candidate in list(candidates):
        if candidate.sparsity and candidate.network not in dense:
            candidates.append(Candidate(f"{candidate.name}-dense", candidate.arch, candidate.arch_kwargs))
            dense.add(candidate.network)
    return candidates


def _from_factory(spec: str, teacher: Classifier) -> list[Candidate]:
    made = import_factory(spec)(teacher)
    try:
        return [c if isinstance(c, Candidate) else Candidate(**c) for c in made]
    except TypeError as error:
        raise SynthkdError(f"{spec} must return Candidate objects or dicts of name, arch, arch_kwargs, sparsity: {error}") from error


def _parse_values(key: str, text: str, spec: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SynthkdError(f"{key} takes comma-separated numbers in {spec!r}, got {text!r}") from None
    if not values:
        raise SynthkdError(f"{key} has no values in {spec!r}")
    return values


def _from_grid(spec: str, teacher: Classifier) -> list[Candidate]:
    settings: dict[str, list[float]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        key, sep, values = part.partition("=")
        key = key.strip()
        if not sep or key not in GRID_KEYS:
            raise SynthkdError(
                f"cannot read {part!r} in the candidate space {spec!r}; use {'; '.join(k + '=...' for k in GRID_KEYS)} "
                "separated by ';', or FILE.py:factory"
            )
        settings[key] = _parse_values(key, values, spec)
    arch, base = teacher.config.arch, dict(teacher.config.arch_kwargs)
    if not is_registered(arch) or "width" not in base:
        raise SynthkdError(
            f"a width/depth grid scales the teacher's zoo architecture, but the teacher is {arch!r}; "
            "describe its candidates with --candidates FILE.py:factory"
        )
    inners = settings.get("inner", [None])
    widths = settings.get("width", [1.0])
    depths = [int(d) for d in settings.get("depth", [0])]  # 0: the teacher's own
    sparsities = settings.get("sparsity", [])
    if (any(w <= 0 for w in widths) or any(d < 0 for d in depths) or any(not 0 < s < 1 for s in sparsities)
            or any(i is not None and i <= 0 for i in inners)):
        raise SynthkdError(f"inner widths, widths and depths must be positive and sparsities in (0, 1) in {spec!r}")
    candidates = []
    for inner, width, depth in product(inners, widths, depths):
        kwargs = {**base, "width": base["width"] * width, **({"blocks": depth} if depth else {}),
                  **({"inner": inner} if inner is not None else {})}
        name = "-".join(part for part in (f"i{inner:g}" if inner is not None else "",
                                          f"w{width:g}" if width != 1.0 or inner is None else "",
                                          f"d{depth}" if depth else "") if part)
        candidates.append(Candidate(name, arch, kwargs))
        candidates.extend(Candidate(f"{name}-s{s:g}", arch, kwargs, s) for s in sparsities)
    return candidates
