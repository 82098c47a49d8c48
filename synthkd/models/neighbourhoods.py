"""Split a network into neighbourhoods at cut points given by module path, and merge them back.

A cut names a module (torchdistill-style, e.g. ``layer2.1``); its output is the boundary
between two neighbourhoods. The network is traced with torch.fx, treating the cut modules as
leaves, and the graph is cut after each of them; neighbourhood k maps the activation at cut
k-1 (the normalised image for k=0) to the activation at cut k (the logits for the last one).
Each piece is a ``GraphModule`` holding *the same module objects* as the network, so training
the pieces trains the network in place, and the merged student is just the network.

Where a student is narrower than its teacher, the channels at a cut differ; learnable 1x1
:class:`CutAdapter` convolutions then map teacher channels into the student piece and its
output back to teacher channels for the loss. On merge, the adapter pair at each cut (out of
piece k, into piece k+1) is fused into one 1x1 convolution attached to the student's cut
module, recorded in the model config so the model directory loads like any other.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.fx as fx
from torch import nn

from ..errors import SynthkdError


class _CutTracer(fx.Tracer):
    def __init__(self, cuts: set[str]):
        super().__init__()
        self.cuts = cuts

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.cuts or super().is_leaf_module(module, qualified_name)


def module_paths(net: nn.Module) -> list[str]:
    return [name for name, _ in net.named_modules() if name]


def resolve_cuts(net: nn.Module, cuts: str | list[str]) -> list[str]:
    """Cut paths from ``"blocks"``, ``"stages"``, ``"none"`` (one neighbourhood: the whole network)
    or explicit paths (checked to exist).

    ``stages``: every top-level child before the head;
    ``blocks``: the children of each top-level ``nn.Sequential`` of composite modules (one
    per residual block), and the other top-level modules whole. The head (what follows the last cut) is
    always its own neighbourhood.
    """
    children = [(name, child) for name, child in net.named_children() if name != "cut_adapters"]
    if isinstance(cuts, str) and cuts == "none":
        return []  # the whole network is one neighbourhood
    if isinstance(cuts, str) and cuts in ("blocks", "stages"):
        if len(children) < 2:
            raise SynthkdError(f"{type(net).__name__} has fewer than two top-level modules; give cut paths explicitly")
        head_start = _head_start(children)
        resolved: list[str] = []
        for name, child in children[:head_start]:
            if cuts == "blocks" and isinstance(child, nn.Sequential) and any(True for _ in child[0].children()):
                resolved.extend(f"{name}.{index}" for index in range(len(child)))
            else:
                resolved.append(name)
        return resolved
    paths = cuts.split(",") if isinstance(cuts, str) else list(cuts)
    valid = set(module_paths(net))
    unknown = [p for p in paths if p not in valid]
    if unknown:
        raise SynthkdError(
            f"cut path(s) {', '.join(unknown)} do not exist in {type(net).__name__}; valid paths: "
            + ", ".join(module_paths(net))
        )
    return paths


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _head_start(children: list[tuple[str, nn.Module]]) -> int:
    """Index where the head begins: the last parametrised top-level module plus what feeds it
    without parameters (e.g. pooling before the classifier)."""
    index = len(children) - 1
    while index > 0 and not _has_parameters(children[index - 1][1]):
        index -= 1
    return index


@dataclass
class Split:
    """A network cut into pieces; ``pieces[k]`` maps the activation at ``cuts[k-1]`` to ``cuts[k]``."""

    cuts: list[str]
    pieces: list[fx.GraphModule]

    @property
    def names(self) -> list[str]:
        return self.cuts + ["head"]


def split_network(net: nn.Module, cuts: list[str]) -> Split:
    """Trace ``net`` and cut it after each module in ``cuts`` (each must be called exactly once
    and be a bottleneck: nothing computed before it may be used after it)."""
    tracer = _CutTracer(set(cuts))
    try:
        graph = tracer.trace(net)
    except Exception as error:  # fx raises many types for untraceable code
        raise SynthkdError(f"cannot trace {type(net).__name__} with torch.fx to split it: {error}") from error
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    cut_nodes = []
    for cut in cuts:
        calls = [n for n in nodes if n.op == "call_module" and n.target == cut]
        if len(calls) != 1:
            raise SynthkdError(f"cut {cut!r} is called {len(calls)} times in the forward pass; a cut must be called once")
        cut_nodes.append(calls[0])
    order = sorted(range(len(cuts)), key=lambda i: position[cut_nodes[i]])
    if order != list(range(len(cuts))):
        raise SynthkdError(f"cuts must be given in forward order; the forward pass runs them as {[cuts[i] for i in order]}")
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise SynthkdError("only networks with a single input can be split into neighbourhoods")
    output = next(n for n in nodes if n.op == "output")
    boundaries = [placeholders[0]] + cut_nodes + [output.args[0]]
    names = cuts + ["head"]
    pieces = []
    for k in range(len(boundaries) - 1):
        start, end = position[boundaries[k]], position[boundaries[k + 1]]
        members = [n for n in nodes[start + 1 : end + 1] if n.op not in ("placeholder", "output")]
        pieces.append(_build_piece(net, members, boundaries[k], boundaries[k + 1], names[k]))
    return Split(cuts, pieces)


def _build_piece(net: nn.Module, members: list[fx.Node], source: fx.Node, result: fx.Node, name: str) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {source: graph.placeholder("x")}
    inside = set(members)

    def lookup(node: fx.Node) -> fx.Node:
        if node in env:
            return env[node]
        if node.op == "get_attr":
            env[node] = graph.node_copy(node, lookup)
            return env[node]
        where = "before" if node not in inside else "inside"
        raise SynthkdError(
            f"the cut before neighbourhood {name!r} is not a bottleneck: it uses {node.name!r} computed {where} "
            "an earlier neighbourhood; choose cuts that every path of the network passes through"
        )

    for node in members:
        env[node] = graph.node_copy(node, lookup)
    graph.output(lookup(result))
    return fx.GraphModule(net, graph, class_name=f"Neighbourhood_{name.replace('.', '_')}")


class CutAdapter(nn.Module):
    """A 1x1 convolution between a teacher's and a student's channels at a cut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.ndim == 4 else nn.functional.linear(x, self.conv.weight.flatten(1), self.conv.bias)


def activation_shapes(split: Split, probe: torch.Tensor) -> list[tuple[int, ...]]:
    """Shape (without batch) of the activation at every cut, then of the output (in eval mode,
    so a probe never moves BatchNorm statistics; each piece's mode is restored)."""
    shapes = []
    with evaluating(*split.pieces), torch.no_grad():
        x = probe
        for piece in split.pieces:
            x = piece(x)
            shapes.append(tuple(x.shape[1:]))
    return shapes


@contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Within: every submodule in eval mode (a probe moves no BatchNorm statistics); after: each
    back in its own mode (pieces share modules, so a piece's flag says nothing of theirs)."""
    modes = {module: module.training for root in modules for module in root.modules()}
    for module in modes:
        module.training = False
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def cut_channel_pairs(teacher: Split, student: Split, probe: torch.Tensor) -> list[tuple[int, int] | None]:
    """For every cut, None when teacher and student activations agree, else (teacher channels,
    student channels) when only the channels differ; any other disagreement is an error."""
    teacher_shapes = activation_shapes(teacher, probe)
    student_shapes = activation_shapes(student, probe)
    pairs: list[tuple[int, int] | None] = []
    for name, t, s in zip(teacher.names, teacher_shapes, student_shapes):
        if t == s:
            pairs.append(None)
        elif name != "head" and len(t) == len(s) and len(t) in (1, 3) and t[1:] == s[1:]:
            pairs.append((t[0], s[0]))
        else:
            why = "the number of classes differs" if name == "head" else (
                "spatial sizes differ: the student must downsample at the same blocks" if len(t) == len(s) == 3
                else "the activations have different ranks")
            raise SynthkdError(f"teacher and student disagree at cut {name!r}: teacher {t}, student {s} ({why})")
    return pairs


def fuse_adapters(outgoing: CutAdapter, incoming: CutAdapter) -> CutAdapter:
    """One 1x1 convolution equal to ``incoming(outgoing(x))``."""
    w_out, b_out = outgoing.conv.weight.flatten(1), outgoing.conv.bias
    w_in, b_in = incoming.conv.weight.flatten(1), incoming.conv.bias
    fused = CutAdapter(w_out.shape[1], w_in.shape[0])
    with torch.no_grad():
        fused.conv.weight.copy_((w_in @ w_out).view_as(fused.conv.weight))
        fused.conv.bias.copy_(w_in @ b_out + b_in)
    return fused


def adapter_key(path: str) -> str:
    return path.replace(".", "__")


def attach_cut_adapters(net: nn.Module, channels: dict[str, int]) -> nn.Module:
    """Give ``net`` a 1x1 convolution after each named cut module (``cut_adapters.<path>``),
    applied by a forward hook, so a merged student keeps its zoo architecture otherwise."""
    for handle in getattr(net, "_cut_adapter_hooks", []):
        handle.remove()  # attaching again replaces, never stacks
    net.cut_adapters = nn.ModuleDict({adapter_key(path): CutAdapter(c, c) for path, c in channels.items()})
    modules = dict(net.named_modules())
    net._cut_adapter_hooks = [
        modules[path].register_forward_hook(
            lambda module, inputs, output, adapter=net.cut_adapters[adapter_key(path)]: adapter(output)
        )
        for path in channels
    ]
    return net
