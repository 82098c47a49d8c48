"""Students born from the teacher: the teacher pruned through its dependency graph.

A student that starts as the teacher's most important channels needs far less distillation than
one from fresh weights. torch-pruning's DepGraph finds which channels must go together (a
convolution's outputs, the batch norm after it, the inputs of every layer that reads them, and
across residual additions the whole stream), so any traceable network, a zoo ResNet as a
torchvision, timm or transformers model, prunes to any width in one pass. :func:`prune` keeps
``keep(path, channels)`` channels of each coupled group, chosen by an importance criterion, and
returns the pruned copy with the teacher's indices of every kept channel (the interfaces of a
neighbourhood distillation that keeps the teacher's channels). The ``pruned`` architecture
rebuilds such a student from the per-module channel counts config.json records, so it is saved
and loaded like any model (weights in safetensors, never a pickled module).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import SynthkdError, one_line
from .classifier import InputFormat, build_network
from .registry import register_model
from .resnet import scaled

PRUNED_ARCH = "pruned"
IMPORTANCES = ("l1", "bn", "taylor")
BUDGET_KINDS = ("params", "flops")
SUGGESTION = "choose another student, e.g. a zoo architecture (--student resnet20:width=0.5) with --init random"
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class BornNetwork:
    """A pruned copy of a teacher network and, per pruned module (or parameter) path, the teacher's
    indices of the channels it kept: ``{"out": [...], "in": [...]}``."""

    net: nn.Module
    kept: dict[str, dict[str, list[int]]]

    def channel_counts(self) -> dict[str, dict[str, int]]:
        """What config.json records to rebuild the shapes: the kept count per path and side."""
        return {path: {side: len(indices) for side, indices in sides.items()} for path, sides in self.kept.items()}


def format_probe(fmt: InputFormat, count: int = 2) -> torch.Tensor:
    """Fixed random network inputs of ``fmt``: what tracing and shape checks run on."""
    return fmt.normalize(torch.rand(count, *fmt.shape, generator=torch.Generator().manual_seed(0)))


def importance_criterion(name: str) -> tp.importance.Importance:
    """``l1``: the L1 norm of the filters of every convolution and linear layer a channel couples
    (DepGraph's group magnitude); ``bn``: the batch norms' |scale| (network slimming); ``taylor``:
    |weight x gradient| of a loss on synthetic images (first-order, needs ``images``)."""
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, normalizer=None, target_types=_LAYERS)
    if name == "bn":
        return tp.importance.BNScaleImportance(normalizer=None)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance(normalizer=None)
    raise SynthkdError(f"unknown importance {name!r}; use one of {', '.join(IMPORTANCES)}")


@contextmanager
def _evaluating(net: nn.Module) -> Iterator[nn.Module]:
    """Eval mode within (tracing and probing leave batch-norm statistics as they are)."""
    training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(training)


def _first_failing_module(net: nn.Module, probe: torch.Tensor) -> tuple[str, Exception] | None:
    """The innermost module whose forward pass raises on ``probe`` and the error, or None."""
    names = {module: path for path, module in net.named_modules()}
    stack: list[str] = []
    hooks = [module.register_forward_pre_hook(lambda module, _inputs: stack.append(names[module])) for module in net.modules()]

    def leave(_module: nn.Module, _inputs: Any, _output: Any) -> None:  # returns None: the output stays
        stack.pop()

    hooks += [module.register_forward_hook(leave) for module in net.modules()]
    try:
        with torch.no_grad():
            net(probe)
    except Exception as error:  # any failure of the user's forward pass is the answer
        return (stack[-1] if stack and stack[-1] else type(net).__name__), error
    finally:
        for hook in hooks:
            hook.remove()
    return None


def _classifier_heads(net: nn.Module, classes: int) -> list[nn.Module]:
    """Layers with exactly the network's classes as outputs: the head keeps its classes."""
    return [m for m in net.modules() if isinstance(m, _LAYERS)
            and (m.out_features if isinstance(m, nn.Linear) else m.out_channels) == classes]


def _accumulate_taylor_gradients(net: nn.Module, images: torch.Tensor, batch_size: int = 128) -> None:
    """Gradients of the cross-entropy to the network's own predictions on ``images``."""
    net.zero_grad()
    for start in range(0, len(images), batch_size):
        logits = net(images[start:start + batch_size])
        F.cross_entropy(logits, logits.argmax(1), reduction="sum").div(len(images)).backward()


def prune(net: nn.Module, probe: torch.Tensor, keep: Callable[[str, int], int], importance: str = "l1",
          images: torch.Tensor | None = None) -> BornNetwork:
    """A copy of ``net`` where each coupled channel group of DepGraph keeps ``keep(path, channels)``
    channels (``path``: the group's first layer; at least 1), the most important by
    ``importance``; ``images`` (normalised network inputs) feed the Taylor criterion. The
    classifier head keeps its classes. Raises one line naming the module where the network cannot
    be pruned consistently (its forward pass fails after pruning)."""
    net = copy.deepcopy(net).requires_grad_(True)  # the graph is traced through autograd (a frozen teacher has none)
    criterion = importance_criterion(importance)
    device = next(net.parameters()).device
    probe = probe.to(device)
    with _evaluating(net):
        with torch.no_grad():
            classes = net(probe).shape[1]
        if importance == "taylor":
            if images is None:
                raise SynthkdError("importance=taylor needs synthetic images, which distillation from a synthetic set "
                                   "gives (not --synthesize or --inputs activations); or choose importance=l1 or bn")
            _accumulate_taylor_gradients(net, images.to(device))
        try:
            graph = tp.DependencyGraph().build_dependency(net, example_inputs=probe, verbose=False)
        except Exception as error:  # torch-pruning raises many types on code it cannot follow
            raise SynthkdError(f"cannot follow the dependency graph of {type(net).__name__} ({one_line(error)}); "
                               f"{SUGGESTION}") from error
        paths = {module: path for path, module in net.named_modules()}
        paths.update({parameter: path for path, parameter in net.named_parameters()})
        plans = []
        for group in graph.get_all_groups(ignored_layers=_classifier_heads(net, classes), root_module_types=list(_LAYERS)):
            root = group[0].dep.target.module
            channels = graph.get_out_channels(root)
            count = min(channels, max(1, int(keep(paths[root], channels))))
            if count == channels:
                continue
            scores = criterion(group)
            if scores is None:  # e.g. the batch-norm criterion on a group without batch norms
                scores = importance_criterion("l1")(group)
            order = torch.argsort(scores.detach().cpu(), descending=True, stable=True)
            plans.append((root, group[0].dep.handler, order[count:].sort().values.tolist()))
        kept: dict[str, dict[str, list[int]]] = {}
        for root, handler, removed in plans:
            group = graph.get_pruning_group(root, handler, removed)
            for dep, indices in group:
                target = dep.target.module
                if target not in paths:  # torch-pruning's stand-ins for functions (add, cat, flatten)
                    continue
                side = "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in"
                size = graph.get_out_channels(target) if side == "out" else graph.get_in_channels(target)
                before = kept.setdefault(paths[target], {}).get(side, list(range(size)))
                dropped = set(indices)
                kept[paths[target]][side] = [channel for position, channel in enumerate(before) if position not in dropped]
            group.prune()
        net.zero_grad(set_to_none=True)
        failure = _first_failing_module(net, probe)
        if failure is not None:
            module, error = failure
            kind = type(net.get_submodule(module)).__name__ if module in paths.values() else "the network"
            raise SynthkdError(f"cannot prune {type(net).__name__}: after pruning, {module!r} ({kind}) fails "
                               f"({one_line(error)}): it depends on channels the dependency graph does not see; {SUGGESTION}")
        with torch.no_grad():
            if net(probe).shape[1] != classes:
                raise SynthkdError(f"pruning {type(net).__name__} changed its number of classes; {SUGGESTION}")
    return BornNetwork(net, kept)


def prune_to_width(net: nn.Module, probe: torch.Tensor, width: float, importance: str = "l1",
                   images: torch.Tensor | None = None) -> BornNetwork:
    """Every group at ``width`` of its channels, rounded as the zoo rounds (so a zoo ResNet at
    width 0.5 gets exactly the shapes of its ``width=0.5`` copy)."""
    if not 0 < width <= 1:
        raise SynthkdError(f"a student born from the teacher keeps a width in (0, 1] of its channels, got width={width}")
    return prune(net, probe, _uniform(width), importance, images)


def _uniform(width: float) -> Callable[[str, int], int]:
    return lambda _path, channels: scaled(channels, width)


def count_flops(module: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``x``, counted wherever the module's weights are."""
    weight = next(module.parameters(), None)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x if weight is None else x.to(weight.device))
    return counter.get_total_flops()


def network_cost(kind: str, net: nn.Module, probe: torch.Tensor) -> float:
    """Parameters, or FLOPs of one image."""
    if kind == "params":
        return float(sum(p.numel() for p in net.parameters()))
    with _evaluating(net):
        return float(count_flops(net, probe[:1]))


def prune_to_budget(net: nn.Module, probe: torch.Tensor, kind: str, fraction: float, importance: str = "l1",
                    images: torch.Tensor | None = None, steps: int = 14) -> BornNetwork:
    """The widest uniform pruning whose ``kind`` (params or flops) is at most ``fraction`` of the
    teacher's, by bisection on the width (the shapes do not depend on the importance criterion,
    so the search prunes by L1 and the chosen width is pruned by ``importance``)."""
    if kind not in BUDGET_KINDS:
        raise SynthkdError(f"unknown budget {kind!r}; a student born from the teacher takes {' or '.join(BUDGET_KINDS)}")
    if not 0 < fraction <= 1:
        raise SynthkdError(f"{kind}={fraction}: a budget is a fraction of the teacher's in (0, 1]")
    teacher_cost = network_cost(kind, net, probe)

    def cost(width: float) -> float:  # width 0: one channel per group, the least pruning can reach
        return network_cost(kind, prune(net, probe, _uniform(width)).net, probe)

    least = cost(0.0)
    if least > fraction * teacher_cost:
        raise SynthkdError(f"{kind}={fraction:g} cannot be reached by pruning: one channel per group still leaves "
                           f"{least:.3g} {kind} ({least / teacher_cost:.2%} of the teacher's); ask for at least "
                           f"{kind}={least / teacher_cost:.3g}")
    low, high = 0.0, 1.0
    if cost(high) > fraction * teacher_cost:
        for _ in range(steps):
            middle = (low + high) / 2
            low, high = (middle, high) if cost(middle) <= fraction * teacher_cost else (low, middle)
    else:
        low = high
    return prune(net, probe, _uniform(low), importance, images)


def drop_blocks_like(net: nn.Module, like: nn.Module) -> None:
    """Keep the first blocks of each stage (a ``nn.Sequential`` child) of ``net`` where ``like``
    has fewer (a shallower zoo ResNet), in place: the first block of a stage carries its
    down-sampling shortcut, and the kept blocks' names match the shallower network's."""
    for name, stage in net.named_children():
        shallower = getattr(like, name, None)
        if isinstance(stage, nn.Sequential) and isinstance(shallower, nn.Sequential) and len(shallower) < len(stage):
            setattr(net, name, stage[:len(shallower)])


def is_narrower_copy(student_net: nn.Module, teacher_net: nn.Module) -> bool:
    """Whether ``student_net`` could be the teacher pruned: every tensor of it is one of the teacher's
    by name, no larger in any dimension, and it has fewer parameters (fewer blocks drop names)."""
    student, teacher = student_net.state_dict(), teacher_net.state_dict()
    return (set(student) <= set(teacher)
            and all(tensor.ndim == teacher[key].ndim and all(a <= b for a, b in zip(tensor.shape, teacher[key].shape))
                    for key, tensor in student.items())
            and sum(p.numel() for p in student_net.parameters()) < sum(p.numel() for p in teacher_net.parameters()))


def born_like(student_net: nn.Module, teacher_net: nn.Module, probe: torch.Tensor, importance: str = "l1",
              images: torch.Tensor | None = None) -> BornNetwork:
    """``student_net`` (the teacher's architecture, narrower and possibly with fewer blocks per
    stage) loaded with the teacher pruned to its shapes; any other difference is one line naming
    the tensor."""
    shallower = copy.deepcopy(teacher_net)
    drop_blocks_like(shallower, student_net)
    targets = {path: module.weight.shape[0] for path, module in student_net.named_modules()
               if isinstance(module, _LAYERS) and getattr(module, "weight", None) is not None}
    born = prune(shallower, probe, lambda path, channels: targets.get(path, channels), importance, images)
    state, wanted = born.net.state_dict(), student_net.state_dict()
    for key, tensor in wanted.items():
        if key not in state or state[key].shape != tensor.shape:
            found = tuple(state[key].shape) if key in state else "missing"
            raise SynthkdError(f"the teacher pruned to the student's channels differs at {key}: pruned {found}, student "
                               f"{tuple(tensor.shape)}; a born student is the teacher's architecture with fewer channels "
                               "or blocks")
    student_net.load_state_dict(state)
    return BornNetwork(student_net, born.kept)


def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> None:
    """Batch-norm running statistics re-estimated on ``images`` (a cumulative average over one
    pass): a pruned network's channels no longer have the statistics the teacher's had."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = [norm.momentum for norm in norms]
    training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                model(images[start:start + batch_size])
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(training)


def birth_record(teacher_fingerprint: str, born: BornNetwork) -> dict[str, Any]:
    """A born student's ``born_from`` config entry: which teacher it was pruned from and, per pruned
    module, the teacher's indices of the output channels it kept, so a saved born student can still
    learn the teacher's kept channels at its cuts."""
    return {"teacher": teacher_fingerprint,
            "channels": {path: sides["out"] for path, sides in born.kept.items() if "out" in sides}}


def kept_channels_at(net: nn.Module, kept_out: dict[str, list[int]], cuts: list[str],
                     probe: torch.Tensor) -> dict[str, list[int]]:
    """The teacher's indices of the channels each cut module of a born ``net`` outputs, for the cuts
    that follow a pruned module: the kept outputs of the last pruned module to finish before the
    cut module returns (for a residual block its last batch norm, coupled with the shortcut and the
    whole stream). Found on one forward pass of ``probe``, so it follows the network's own order."""
    finished: list[str] = []
    watched = set(kept_out) | set(cuts)
    hooks = [module.register_forward_hook(lambda _module, _inputs, _output, path=path: finished.append(path))
             for path, module in net.named_modules() if path in watched]
    try:
        with _evaluating(net), torch.no_grad():
            net(probe.to(next(net.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    found: dict[str, list[int]] = {}
    last = None
    for path in finished:
        if path in kept_out:
            last = path
        if path in cuts and last is not None:
            found[path] = list(kept_out[last])
    return found


def pruned_arch_kwargs(base_arch: str, base_kwargs: dict[str, Any], born: BornNetwork) -> dict[str, Any]:
    """The ``arch_kwargs`` of a ``pruned`` model config: the base network and its kept channel counts."""
    return {"base": {"arch": base_arch, "arch_kwargs": dict(base_kwargs)}, "channels": born.channel_counts()}


def _resize_to(net: nn.Module, path: str, counts: dict[str, int]) -> None:
    """Give the module (or parameter) at ``path`` ``counts`` channels per side, dropping the last ones
    (the values come from the weights file)."""
    parameters = dict(net.named_parameters())
    if path in parameters:  # a bare nn.Parameter: torch-pruning prunes its last non-singleton dimension
        owner, _, name = path.rpartition(".")
        shape = list(parameters[path].shape)
        shape[max(d for d, size in enumerate(shape) if size > 1)] = counts["out"]
        setattr(net.get_submodule(owner) if owner else net, name, nn.Parameter(torch.empty(shape)))
        return
    module = net.get_submodule(path)
    pruner = tp.pruner.function.PrunerBox.get(tp.ops.module2type(module))
    if pruner is None:
        raise SynthkdError(f"cannot rebuild the pruned {type(module).__name__} at {path}: torch-pruning has no pruner for it")
    for side, count in counts.items():
        current = pruner.get_out_channels(module) if side == "out" else pruner.get_in_channels(module)
        if current is not None and current > count:
            (pruner.prune_out_channels if side == "out" else pruner.prune_in_channels)(module, list(range(count, current)))


@register_model(PRUNED_ARCH, listed=False)
def pruned(base: dict[str, Any], channels: dict[str, dict[str, int]]) -> nn.Module:
    """A network (any source the project loads) with fewer channels, as :func:`prune` made it."""
    net = build_network(base["arch"], dict(base.get("arch_kwargs", {})))
    for path, counts in channels.items():
        _resize_to(net, path, counts)
    return net
