"""A student assembled from the neighbourhoods of different networks: what Student Search makes.

Neighbourhood k is piece k of its own *source* network (a zoo architecture or FILE.py:factory
with its arguments), cut at the same module paths as the others; where the channels at a cut
differ, a 1x1 convolution (the fused cut adapters) maps one piece's output to the next one's
input. The config records every source and adapter, so the model rebuilds from ``config.json``
like any zoo model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .neighbourhoods import CutAdapter, adapter_key, resolve_cuts, split_network
from .classifier import build_network
from .registry import register_model


class NeighbourhoodChain(nn.Module):
    def __init__(self, cuts: list[str], sources: list[dict[str, Any]], adapters: dict[str, list[int]]):
        super().__init__()
        if len(sources) != len(cuts) + 1:
            raise ValueError(f"{len(cuts)} cuts need {len(cuts) + 1} sources, got {len(sources)}")
        pieces = []
        for k, source in enumerate(sources):
            net = build_network(source["arch"], dict(source.get("arch_kwargs", {})))
            pieces.append(split_network(net, resolve_cuts(net, cuts)).pieces[k])
        self.cuts = list(cuts)
        self.pieces = nn.ModuleList(pieces)
        self.adapters = nn.ModuleDict({adapter_key(cut): CutAdapter(*adapters[cut]) for cut in cuts if cut in adapters})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, piece in enumerate(self.pieces):
            x = piece(x)
            if k < len(self.cuts) and adapter_key(self.cuts[k]) in self.adapters:
                x = self.adapters[adapter_key(self.cuts[k])](x)
        return x


@register_model("neighbourhood-chain", listed=False)
def neighbourhood_chain(cuts: list[str], sources: list[dict[str, Any]], adapters: dict[str, list[int]] | None = None) -> NeighbourhoodChain:
    """Pieces of several networks chained at shared cuts, with 1x1 adapters where channels differ."""
    return NeighbourhoodChain(cuts, sources, adapters or {})
