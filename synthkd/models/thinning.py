"""Interface-keeping students: a network thinned inside its neighbourhoods, never at a cut.

An *inner channel group* is a convolution or linear layer (the producer) whose output reaches
exactly one other convolution or linear layer (the consumer) through per-channel operations only
(batch norm, element-wise activations, dropout), inside one neighbourhood. Its channels are
private to that neighbourhood: dropping some changes the producer's outputs, the batch norms'
channels and the consumer's inputs, and nothing a cut exposes. In a ResNet basic block this is
``conv1 -> bn1 -> relu -> conv2``; ``conv2`` is not one (its output is added to the shortcut).

:func:`thin` makes such a student from any traceable network (a zoo ResNet, ``FILE.py:factory``),
starting from the teacher's most important channels; :func:`rebuild` makes the same shapes from a
``{producer: channels}`` record, which is what the ``thinned`` architecture stores in config.json.
"""

from __future__ import annotations

import copy
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import SynthkdError
from .classifier import Classifier, build_network
from .neighbourhoods import activation_shapes, resolve_cuts, split_network
from .registry import register_model
from .resnet import scaled

THINNED_ARCH = "thinned"

# Exact types: a subclass may take other constructor arguments, so it is never resized.
_LINEAR_KINDS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.hardswish, F.mish,
    torch.sigmoid, torch.tanh, F.dropout, F.dropout1d, F.dropout2d,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}


@dataclass(frozen=True)
class Group:
    """Channels private to one neighbourhood: ``producer`` makes them, ``norms`` (batch norms on
    the way) scale them, ``consumer`` reads them; ``neighbourhood`` indexes ``cuts + ["head"]``."""

    producer: str
    norms: tuple[str, ...]
    consumer: str
    channels: int
    neighbourhood: int


def _trace(net: nn.Module) -> fx.Graph:
    try:
        return fx.Tracer().trace(net)
    except Exception as error:  # fx raises many types for untraceable code
        raise SynthkdError(f"cannot trace {type(net).__name__} with torch.fx to find its inner channels: {error}") from error


def _scopes(node: fx.Node) -> set[str]:
    """The module paths whose forward pass computed ``node``."""
    return {value[0] if isinstance(value, tuple) else key for key, value in node.meta.get("nn_module_stack", {}).items()}


def _neighbourhood_of(nodes: list[fx.Node], cuts: list[str]) -> dict[fx.Node, int]:
    """Neighbourhood k holds what runs after the end of cut k-1 up to the end of cut k (its last node)."""
    ends = []
    for cut in cuts:
        inside = [i for i, node in enumerate(nodes) if cut in _scopes(node)]
        if not inside:
            raise SynthkdError(f"cut {cut!r} is never called in the forward pass; choose modules the network runs")
        ends.append(max(inside))
    ends.sort()
    return {node: bisect_left(ends, i) for i, node in enumerate(nodes)}


def _only_input(node: fx.Node, source: fx.Node) -> bool:
    """``source`` is ``node``'s first argument and no other argument is a tensor of the graph."""
    others = list(node.args[1:]) + list(node.kwargs.values())
    return bool(node.args) and node.args[0] is source and not any(isinstance(a, fx.Node) for a in others)


def inner_groups(net: nn.Module, cuts: str | list[str] | None = None) -> list[Group]:
    """Every inner channel group of ``net`` whose producer and consumer lie in the same
    neighbourhood of ``cuts`` (``"blocks"``, ``"stages"`` or module paths; None: no cuts).

    The whole network is traced through its blocks. A group needs: producer and consumer of the
    same kind (both convolutions of one dimension without groups, or both linear layers), each
    module on the way called once and its weights not read elsewhere, and every node on the way
    used by the next one only (a residual add, a concatenation or a flatten ends the chain)."""
    graph = _trace(net)
    nodes = list(graph.nodes)
    cut_paths = [] if cuts is None else resolve_cuts(net, cuts)
    neighbourhood = _neighbourhood_of(nodes, cut_paths)
    modules = dict(net.named_modules())
    calls = Counter(node.target for node in nodes if node.op == "call_module")
    read_elsewhere = {node.target.rpartition(".")[0] for node in nodes if node.op == "get_attr"}

    def resizable(path: str) -> bool:
        return calls[path] == 1 and path not in read_elsewhere

    groups = []
    for node in nodes:
        producer = modules.get(node.target) if node.op == "call_module" else None
        if type(producer) not in _LINEAR_KINDS or getattr(producer, "groups", 1) != 1 or not resizable(node.target):
            continue
        channels = producer.weight.shape[0]
        norms: list[str] = []
        current = node
        while len(current.users) == 1:
            user = next(iter(current.users))
            if not _only_input(user, current):
                break
            module = modules.get(user.target) if user.op == "call_module" else None
            if type(module) is type(producer):
                if (module.weight.shape[1] == channels and getattr(module, "groups", 1) == 1 and resizable(user.target)
                        and neighbourhood[user] == neighbourhood[node]):
                    groups.append(Group(node.target, tuple(norms), user.target, channels, neighbourhood[node]))
                break
            if type(module) in _NORMS and module.num_features == channels and resizable(user.target):
                norms.append(user.target)
            elif not (isinstance(module, _ELEMENTWISE_MODULES)
                      or (user.op == "call_function" and user.target in _ELEMENTWISE_FUNCTIONS)
                      or (user.op == "call_method" and user.target in _ELEMENTWISE_METHODS)):
                break
            current = user
    return groups


def channel_importance(net: nn.Module, group: Group) -> torch.Tensor:
    """L1 norm of each producer filter times |gamma| of the batch norms that scale it: the
    magnitude criteria of filter pruning (Li et al., 2017) and network slimming (Liu et al., 2017)."""
    modules = dict(net.named_modules())
    weight = modules[group.producer].weight.detach()
    score = weight.abs().flatten(1).sum(1)
    for path in group.norms:
        if modules[path].weight is not None:
            score = score * modules[path].weight.detach().abs()
    return score


def most_important(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores, in channel order (ties: the earlier channel)."""
    return torch.argsort(scores, descending=True, stable=True)[:count].sort().values


def _resized(module: nn.Module, in_features: int | None, out_features: int | None) -> nn.Module:
    """A freshly initialised module like ``module`` with other channel counts."""
    reference = next((t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), None)
    like = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    if isinstance(module, _NORMS):
        return type(module)(out_features, module.eps, module.momentum, module.affine, module.track_running_stats, **like)
    if isinstance(module, nn.Linear):
        return nn.Linear(in_features or module.in_features, out_features or module.out_features, module.bias is not None, **like)
    return type(module)(
        in_features or module.in_channels, out_features or module.out_channels, module.kernel_size, module.stride,
        module.padding, module.dilation, module.groups, module.bias is not None, module.padding_mode, **like,
    )


def _replace(net: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, name, module)


def rebuild(net: nn.Module, kept: dict[str, int]) -> nn.Module:
    """Give the groups of ``net`` named by their producer ``kept[producer]`` channels, with freshly
    initialised modules (in place; returns ``net``): a saved thinned student's shapes from its config."""
    groups = {group.producer: group for group in inner_groups(net)}
    unknown = sorted(set(kept) - set(groups))
    if unknown:
        raise SynthkdError(
            f"cannot thin {', '.join(unknown)} in {type(net).__name__}: not the producer of an inner channel group; "
            f"thinnable producers: {', '.join(groups) or 'none'}"
        )
    sizes: dict[str, dict[str, int]] = {}
    for producer, count in kept.items():
        if int(count) < 1:
            raise SynthkdError(f"{producer} must keep at least one channel, got {count}")
        group = groups[producer]
        sizes.setdefault(producer, {})["out_features"] = int(count)
        for path in group.norms:
            sizes.setdefault(path, {})["out_features"] = int(count)
        sizes.setdefault(group.consumer, {})["in_features"] = int(count)
    modules = dict(net.named_modules())
    for path, size in sizes.items():
        _replace(net, path, _resized(modules[path], size.get("in_features"), size.get("out_features")))
    return net


def copy_from_teacher(student_net: nn.Module, teacher_net: nn.Module, cuts: str | list[str] | None = None) -> nn.Module:
    """Initialise a student that is the teacher with narrower inner groups (e.g. a zoo ResNet with
    ``inner`` < 1) from the teacher: each group keeps the teacher's most important channels, every
    other tensor is copied. Any other difference is an error naming the tensor and both shapes."""
    student_modules = dict(student_net.named_modules())
    selected: dict[str, dict[int, torch.Tensor]] = {}  # module path -> {dimension: kept indices}
    for group in inner_groups(teacher_net, cuts):
        student_producer = student_modules.get(group.producer)
        if student_producer is None or not hasattr(student_producer, "weight"):
            continue  # the state-dict comparison below names what is missing
        count = student_producer.weight.shape[0]
        if count == group.channels:
            continue
        if count > group.channels:
            raise SynthkdError(
                f"{group.producer} has {count} output channels in the student but {group.channels} in the teacher; "
                "a thinned student can only keep fewer"
            )
        keep = most_important(channel_importance(teacher_net, group), count)
        for path in (group.producer, *group.norms):
            selected.setdefault(path, {})[0] = keep
        selected.setdefault(group.consumer, {})[1] = keep
    teacher_state, student_state = teacher_net.state_dict(), student_net.state_dict()
    if teacher_state.keys() != student_state.keys():
        missing = sorted(teacher_state.keys() - student_state.keys())
        extra = sorted(student_state.keys() - teacher_state.keys())
        raise SynthkdError(
            f"the student is not the teacher's architecture: missing {missing[:5]}, extra {extra[:5]}; "
            "copy_from_teacher needs the same modules with narrower inner channels"
        )
    state = {}
    for key, tensor in teacher_state.items():
        for dim, keep in selected.get(key.rpartition(".")[0], {}).items():
            if tensor.ndim > dim:
                tensor = tensor.index_select(dim, keep)
        if tensor.shape != student_state[key].shape:
            raise SynthkdError(
                f"student and teacher differ at {key}: teacher {tuple(tensor.shape)}, student "
                f"{tuple(student_state[key].shape)}; only the inner channels of a neighbourhood may be thinner"
            )
        state[key] = tensor
    student_net.load_state_dict(state)
    return student_net


def check_interfaces(teacher_net: nn.Module, student_net: nn.Module, cuts: str | list[str], probe: torch.Tensor) -> None:
    """Raise unless the student's activation on ``probe`` has the teacher's shape at every cut and
    at the output (both run in eval mode, so batch-norm statistics stay untouched)."""
    cut_paths = resolve_cuts(teacher_net, cuts)
    shapes = []
    for net in (teacher_net, student_net):
        training = net.training
        net.eval()
        try:
            shapes.append(activation_shapes(split_network(net, cut_paths), probe))
        finally:
            net.train(training)
    for name, teacher_shape, student_shape in zip(cut_paths + ["head"], *shapes):
        if teacher_shape != student_shape:
            raise SynthkdError(
                f"the student's activation at cut {name!r} has shape {student_shape}, the teacher's {teacher_shape}; "
                "an interface-keeping student must keep the teacher's shape at every cut"
            )


def thin(
    net: nn.Module, ratio: float, cuts: str | list[str], *, probe: torch.Tensor, teacher_weights: bool = True,
) -> tuple[nn.Module, dict[str, int]]:
    """A copy of ``net`` whose inner groups (see :func:`inner_groups`) keep ``round(ratio * channels)``
    channels (at least one), checked on ``probe`` to keep every cut's activation shape. With
    ``teacher_weights`` the student is the pruned teacher (:func:`copy_from_teacher`); otherwise the
    thinned modules are freshly initialised and the rest keeps ``net``'s weights. Returns the
    student and ``{producer: kept channels}`` for :func:`rebuild` / the ``thinned`` architecture."""
    if not 0 < ratio <= 1:
        raise SynthkdError(f"the thinning ratio must be in (0, 1], got {ratio}")
    kept = {group.producer: scaled(group.channels, ratio) for group in inner_groups(net, cuts)}
    student = rebuild(copy.deepcopy(net), kept)
    if teacher_weights:
        copy_from_teacher(student, net, cuts)
    check_interfaces(net, student, cuts, probe)
    return student, kept


def thinned_arch_kwargs(base_arch: str, base_kwargs: dict[str, Any], kept: dict[str, int]) -> dict[str, Any]:
    """The ``arch_kwargs`` of a ``thinned`` model config: the base network and its kept channels."""
    return {"base": {"arch": base_arch, "arch_kwargs": dict(base_kwargs)}, "kept": dict(kept)}


@register_model(THINNED_ARCH, listed=False)
def thinned(base: dict[str, Any], kept: dict[str, int]) -> nn.Module:
    """A network (zoo or FILE.py:factory) with thinner inner channel groups, as :func:`thin` made it."""
    return rebuild(build_network(base["arch"], dict(base.get("arch_kwargs", {}))), kept)


def is_thinning_of(student: Classifier, teacher: Classifier) -> bool:
    """Whether a zoo student is the teacher's architecture with only its blocks' insides thinner:
    the same architecture and arguments but ``inner`` (``blocks`` may be spelled out), the same
    tensors by name, and fewer parameters."""
    s, t = student.config, teacher.config
    differing = {key for key in {*s.arch_kwargs, *t.arch_kwargs} if s.arch_kwargs.get(key) != t.arch_kwargs.get(key)}
    return (s.arch == t.arch and differing <= {"inner", "blocks"}
            and student.net.state_dict().keys() == teacher.net.state_dict().keys()
            and _parameters(student.net) < _parameters(teacher.net))  # the teacher itself is no student to start


def _parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
