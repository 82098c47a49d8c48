"""Distill every candidate piece once (or find it in the cache) and measure what it costs.

Each dense candidate network is a student for :class:`NeighbourhoodDistiller`; its pieces are
spread over the ranks together with the pieces of all other candidates (longest first, by
counted FLOPs and epochs), and each rank trains its share with local distillers, one per
candidate, so the pieces of one candidate share the teacher's forward pass. A pruned candidate
starts from its dense piece, has the smallest-magnitude fraction of every convolution and linear
weight set to zero, and is re-distilled briefly with those weights held at zero.

The cache: one directory per candidate network under ``cache_dir``, named by the distiller's key
of (teacher fingerprint, cuts, candidate network and starting weights, data fingerprint,
training settings), with one safetensors + JSON pair per cut; a pruned candidate's directory is
keyed by its dense directory, the sparsity and the re-distillation settings. A second search
over the same space, with any budget, trains nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch import nn
from torch.utils.data import Dataset

from ..errors import SynthkdError
from ..io import atomic_write_json
from ..models import Classifier, ModelConfig
from ..models.pruning import hold_at_zero, prune_by_magnitude
from ..models.born import born_like, format_probe, is_narrower_copy
from ..models.thinning import copy_from_teacher, is_thinning_of
from ..teacher_activations import TeacherActivations
from ..neighbourhood_training import NeighbourhoodSettings, NeighbourhoodDistiller, StudentNeighbourhood, balance
from ..models.neighbourhoods import CutAdapter, adapter_key, fuse_adapters
from .costs import KINDS, measure, weight_free_cost
from .knapsack import Solution, pareto_frontier
from .space import Candidate


def build_candidate(teacher: Classifier, candidate: Candidate, seed: int) -> Classifier:
    """The candidate network with the teacher's input format and classes (same seed, same weights);
    a candidate that is the teacher thinner inside its blocks starts from the teacher's strongest
    channels, and one that is narrower (or shallower) as the teacher pruned to its shapes."""
    set_seed(seed)
    model = Classifier.from_config(ModelConfig(arch=candidate.arch, arch_kwargs=dict(candidate.arch_kwargs),
                                               input=teacher.input_format, class_names=list(teacher.config.class_names)))
    if is_thinning_of(model, teacher):
        copy_from_teacher(model.net, teacher.net)
    elif model.config.arch == teacher.config.arch and is_narrower_copy(model.net, teacher.net):
        born_like(model.net, teacher.net, format_probe(teacher.input_format))
    return model


@dataclass
class Option:
    """One distilled candidate piece of one neighbourhood."""

    neighbourhood: int
    candidate: Candidate  # the candidate whose network provides the piece
    candidates: list[str]  # every candidate with this same piece
    state: dict[str, torch.Tensor]  # the StudentNeighbourhood's weights: piece and adapters
    relative_mse: float
    resumed: bool  # found in the cache
    seconds: float  # training time (when it was trained)
    rank: int  # the process that trained it
    in_channels: int | None  # the piece's input channels where they differ from the teacher's
    out_channels: int | None
    costs: dict[str, float] = field(default_factory=dict)


def _signature(neighbourhood: StudentNeighbourhood) -> tuple:
    return neighbourhood.piece.code, tuple((n, tuple(t.shape)) for n, t in neighbourhood.state_dict().items())


def _hint(name: str, error: SynthkdError) -> SynthkdError:
    hint = "; candidates with fewer blocks need stage-level cuts (--cuts stages)" if "do not exist" in str(error) else ""
    return SynthkdError(f"candidate {name!r}: {error}{hint}")


@dataclass
class _Task:
    """A piece to distill: a dense one, and the pruned ones that start from it."""

    candidate: Candidate
    neighbourhood: int
    names: list[str]
    sparse: dict[float, list[str]] = field(default_factory=dict)  # sparsity -> candidate names


class Exploration:
    """Every distilled option of every neighbourhood with its costs; frontiers and merging."""

    def __init__(self, teacher: Classifier, space: list[Candidate], config: NeighbourhoodSettings, sparsity_epochs: int,
                 accelerator: Accelerator):
        self.teacher = teacher
        self.space = space
        self.config = config
        self.sparsity_epochs = sparsity_epochs
        self.accelerator = accelerator
        self.plans: dict[str, NeighbourhoodDistiller] = {}
        for candidate in space:
            if not candidate.sparsity:
                try:
                    self.plans[candidate.name] = self._distiller(candidate, config, owned=[])
                except SynthkdError as error:
                    raise _hint(candidate.name, error) from error
        first = next(iter(self.plans.values()))
        self.cuts, self.names, self.teacher_split = first.cuts, first.names, first.teacher_split
        fmt = teacher.input_format
        self.activations = [fmt.normalize(torch.rand(1, *fmt.shape, generator=torch.Generator().manual_seed(0)))]
        with torch.no_grad():
            for piece in self.teacher_split.pieces:
                self.activations.append(piece(self.activations[-1].clone()))
        self.tasks = self._tasks()
        self.options: list[list[Option]] = []
        self.links: dict[tuple[int, int, int], dict[str, float]] = {}
        self.teacher_costs: dict[str, float] = {}
        self._adapter_costs: dict[tuple[int, tuple[int, int]], dict[str, float]] = {}

    def _distiller(self, candidate: Candidate, config: NeighbourhoodSettings, owned: list[int]) -> NeighbourhoodDistiller:
        student = build_candidate(self.teacher, candidate, config.seed)
        return NeighbourhoodDistiller(self.teacher, student, config, self.accelerator, owned=owned,
                                      phase=f"search/{candidate.name}")

    def _tasks(self) -> list[_Task]:
        """Unique pieces per neighbourhood, in candidate order; pruned ones under their dense piece."""
        tasks: list[_Task] = []
        for k in range(len(self.names)):
            by_signature: dict[tuple, _Task] = {}
            by_network: dict[str, _Task] = {}
            for candidate in self.space:
                if candidate.sparsity:
                    continue
                signature = _signature(self.plans[candidate.name].neighbourhoods[k])
                if signature in by_signature:
                    by_signature[signature].names.append(candidate.name)
                else:
                    by_signature[signature] = _Task(candidate, k, [candidate.name])
                    tasks.append(by_signature[signature])
                by_network[candidate.network] = by_signature[signature]
            for candidate in self.space:
                if candidate.sparsity:
                    by_network[candidate.network].sparse.setdefault(candidate.sparsity, []).append(candidate.name)
        return tasks

    def cost_lower_bound(self, kind: str) -> tuple[float, float]:
        """(least cost any student can have, the teacher's cost) in parameters or FLOPs, from the
        untrained pieces, so an impossible budget fails before any training. Neither depends on
        the weights (a pruned piece keeps the same number of entries), and the adapters a mixed
        choice needs only add, so the sum of each neighbourhood's cheapest piece is a lower bound."""
        if kind not in ("params", "flops"):
            raise SynthkdError(f"a lower bound before training exists for params and flops, not {kind}")
        total = 0.0
        for k in range(len(self.names)):
            cheapest = float("inf")
            for task in (t for t in self.tasks if t.neighbourhood == k):
                neighbourhood = self.plans[task.candidate.name].neighbourhoods[k]
                x = self._piece_input(k, neighbourhood)
                cheapest = min(cheapest, weight_free_cost(kind, neighbourhood.piece, x))
                for sparsity in task.sparse:
                    pruned = copy.deepcopy(neighbourhood.piece)
                    prune_by_magnitude(pruned, sparsity)
                    cheapest = min(cheapest, weight_free_cost(kind, pruned, x))
            total += cheapest
        teacher = sum(weight_free_cost(kind, piece, x) for piece, x in zip(self.teacher_split.pieces, self.activations))
        return total, teacher

    def _piece_input(self, k: int, neighbourhood: StudentNeighbourhood) -> torch.Tensor:
        """The probe input of neighbourhood k's piece: the teacher's activation at its cut, through
        the neighbourhood's input adapter when it has one."""
        with torch.no_grad():
            x = self.activations[k].to(next(neighbourhood.parameters()).device)  # trained pieces may sit on the GPU
            return neighbourhood.in_adapter(x) if neighbourhood.in_adapter is not None else x

    # --- distillation -------------------------------------------------------------------------

    def distill(self, dataset: Dataset, data_fingerprint: str, cache_dir: Path) -> None:
        """Train (or load) every option, spread over the ranks; every rank ends with all of them,
        and with the costs the main process measured."""
        accelerator = self.accelerator
        work = [self.plans[t.candidate.name].flops[t.neighbourhood] * (self.config.epochs + self.sparsity_epochs * len(t.sparse))
                for t in self.tasks]
        mine = balance([float(w) for w in work], accelerator.num_processes)[accelerator.process_index]
        # The teacher's activations once for every candidate (building a disk cache is collective).
        activations = TeacherActivations(self.teacher, self.teacher_split, dataset, self.config, data_fingerprint, accelerator,
                                         cache_dir, needed=sorted({self.tasks[i].neighbourhood for i in mine}))
        records = []
        for candidate in self.space:
            owned = [i for i in mine if self.tasks[i].candidate.name == candidate.name]
            if owned:
                records.extend(self._distill_candidate(candidate, [self.tasks[i] for i in owned], dataset, data_fingerprint,
                                                       cache_dir, activations))
        self.options = [[] for _ in self.names]
        for (task_index, sparsity), state, metrics in sorted(gather_object(records), key=lambda record: record[0]):
            task = self.tasks[task_index]
            plan = self.plans[task.candidate.name].neighbourhoods[task.neighbourhood]
            names = task.sparse[sparsity] if sparsity else task.names
            candidate = next(c for c in self.space if c.name == names[0])
            self.options[task.neighbourhood].append(Option(
                task.neighbourhood, candidate, names, state, metrics["relative_mse"], bool(metrics.get("resumed")),
                metrics["seconds"], metrics["rank"], plan.in_adapter.conv.out_channels if plan.in_adapter else None,
                plan.out_adapter.conv.in_channels if plan.out_adapter else None))
        self._measure_costs()

    def _distill_candidate(self, candidate: Candidate, tasks: list[_Task], dataset: Dataset, data_fingerprint: str,
                           cache_dir: Path, activations: TeacherActivations) -> list[tuple]:
        index = {id(t): i for i, t in enumerate(self.tasks)}
        distiller = self._distiller(candidate, self.config, owned=[t.neighbourhood for t in tasks])
        key = distiller.fingerprint(data_fingerprint)
        report = distiller.train(dataset, cache_dir / key, data_fingerprint, activations)["neighbourhoods"]
        atomic_write_json(cache_dir / key / "candidate.json", {"candidate": asdict(candidate), "cuts": self.cuts,
                                                                "teacher": self.teacher.fingerprint(), "data": data_fingerprint,
                                                                "config": asdict(self.config)})
        records = [((index[id(task)], 0.0), _copy(distiller.neighbourhoods[task.neighbourhood]), report[self.names[task.neighbourhood]])
                   for task in tasks]
        sparse_config = replace(self.config, epochs=self.sparsity_epochs)
        for sparsity in sorted({s for task in tasks for s in task.sparse}):
            pruning = [task for task in tasks if sparsity in task.sparse]
            pruned = self._distiller(candidate, sparse_config, owned=[task.neighbourhood for task in pruning])
            hooks = []
            for task in pruning:
                pruned.neighbourhoods[task.neighbourhood].load_state_dict(distiller.neighbourhoods[task.neighbourhood].state_dict())
                hooks += hold_at_zero(prune_by_magnitude(pruned.neighbourhoods[task.neighbourhood].piece, sparsity))
            folder = hashlib.sha256(json.dumps([key, sparsity, asdict(sparse_config)]).encode()).hexdigest()[:16]
            metrics = pruned.train(dataset, cache_dir / f"{key}-sparse-{folder}", data_fingerprint, activations)["neighbourhoods"]
            for hook in hooks:
                hook.remove()
            records += [((index[id(task)], sparsity), _copy(pruned.neighbourhoods[task.neighbourhood]), metrics[self.names[task.neighbourhood]])
                        for task in pruning]
        return records

    # --- costs --------------------------------------------------------------------------------

    def _measure_costs(self) -> None:
        """Costs of every option and every adapter a choice can need, measured by the main
        process (latency differs between processes) and shared with the others."""
        payload: list[Any] = [None]
        if self.accelerator.is_main_process:
            device = self.accelerator.device
            option_costs = []
            for k, options in enumerate(self.options):
                option_costs.append([])
                for i in range(len(options)):
                    neighbourhood = self.neighbourhood(k, i)
                    option_costs[-1].append(measure(neighbourhood.piece, self._piece_input(k, neighbourhood), device))
            links = {}
            for k in range(len(self.cuts)):
                for a, before in enumerate(self.options[k]):
                    for b, after in enumerate(self.options[k + 1]):
                        channels = self._adapter_channels(k, before, after)
                        if channels is not None:
                            links[(k, a, b)] = self._adapter_cost(k, channels, device)
            # The teacher's cost in the same terms: the sum over its pieces (for latency this
            # includes the per-piece call overhead every student's sum includes too).
            pieces = [measure(piece, x, device) for piece, x in zip(self.teacher_split.pieces, self.activations)]
            payload = [(option_costs, links, {kind: sum(p[kind] for p in pieces) for kind in KINDS})]
        broadcast_object_list(payload)
        option_costs, self.links, self.teacher_costs = payload[0]
        for options, costs in zip(self.options, option_costs):
            for option, cost in zip(options, costs):
                option.costs = cost

    def neighbourhood(self, k: int, i: int) -> StudentNeighbourhood:
        """Option i of neighbourhood k as trained: its piece between its own adapters."""
        option = self.options[k][i]
        plan = next(self.plans[c.name] for c in self.space if not c.sparsity and c.network == option.candidate.network)
        plan.neighbourhoods[k].load_state_dict(option.state)
        return plan.neighbourhoods[k]

    def _adapter_channels(self, k: int, before: Option, after: Option) -> tuple[int, int] | None:
        """(in, out) channels of the 1x1 convolution at cut k between two options, if one is needed."""
        if before.out_channels is None and after.in_channels is None:
            return None
        teacher_channels = self.activations[k + 1].shape[1]
        return (before.out_channels or teacher_channels, after.in_channels or teacher_channels)

    def _adapter_cost(self, k: int, channels: tuple[int, int], device: torch.device) -> dict[str, float]:
        if (k, channels) not in self._adapter_costs:
            shape = self.activations[k + 1].shape[2:]
            self._adapter_costs[(k, channels)] = measure(CutAdapter(*channels), torch.zeros(1, channels[0], *shape), device)
        return self._adapter_costs[(k, channels)]

    # --- selection and merging ----------------------------------------------------------------

    def frontier(self, kind: str) -> list[Solution]:
        if kind not in KINDS:
            raise SynthkdError(f"unknown cost kind {kind!r}; use one of {', '.join(KINDS)}")
        costs = [[o.costs[kind] for o in options] for options in self.options]
        errors = [[o.relative_mse for o in options] for options in self.options]
        return pareto_frontier(costs, errors, lambda k, a, b: self.links[(k, a, b)][kind] if (k, a, b) in self.links else 0.0)

    def total_costs(self, choice: tuple[int, ...]) -> dict[str, float]:
        chosen = [self.options[k][i] for k, i in enumerate(choice)]
        totals = {kind: sum(o.costs[kind] for o in chosen) for kind in KINDS}
        for k in range(len(self.cuts)):
            link = self.links.get((k, choice[k], choice[k + 1]))
            for kind in KINDS:
                totals[kind] += link[kind] if link else 0.0
        return totals

    def uniform_choices(self) -> dict[str, tuple[int, ...]]:
        """For every candidate, the choice of its own piece everywhere (the plain student)."""
        return {c.name: tuple(next(i for i, o in enumerate(options) if c.name in o.candidates) for options in self.options)
                for c in self.space}

    def pruned_masks(self, student: Classifier, choice: tuple[int, ...]) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(weight, kept entries) of the chosen pruned pieces of an assembled student, so that a
        fine-tune can hold the pruned entries at zero."""
        return [(layer.weight, layer.weight.detach() != 0)
                for k, i in enumerate(choice) if self.options[k][i].candidate.sparsity
                for layer in student.net.pieces[k].modules() if isinstance(layer, (nn.Conv2d, nn.Linear))]

    def describe(self, choice: tuple[int, ...]) -> list[dict[str, Any]]:
        return [{"neighbourhood": self.names[k], "candidate": o.candidate.name, "same_piece_as": o.candidates,
                 "relative_mse": o.relative_mse, "costs": o.costs}
                for k, o in ((k, self.options[k][i]) for k, i in enumerate(choice))]

    def assemble(self, choice: tuple[int, ...]) -> Classifier:
        """The student of ``choice``: the chosen pieces chained, adapter pairs fused at each cut."""
        chosen = [self.options[k][i] for k, i in enumerate(choice)]
        adapters, fused = {}, {}
        for k, cut in enumerate(self.cuts):
            channels = self._adapter_channels(k, chosen[k], chosen[k + 1])
            if channels is None:
                continue
            adapters[cut] = list(channels)
            outgoing, incoming = _adapter(chosen[k].state, "out_adapter"), _adapter(chosen[k + 1].state, "in_adapter")
            fused[cut] = fuse_adapters(outgoing, incoming) if outgoing and incoming else (outgoing or incoming)
        sources = [{"arch": o.candidate.arch, "arch_kwargs": dict(o.candidate.arch_kwargs)} for o in chosen]
        student = Classifier.from_config(ModelConfig(
            arch="neighbourhood-chain", arch_kwargs={"cuts": list(self.cuts), "sources": sources, "adapters": adapters},
            input=self.teacher.input_format, class_names=list(self.teacher.config.class_names)))
        for piece, option in zip(student.net.pieces, chosen):
            piece.load_state_dict({n[len("piece."):]: t for n, t in option.state.items() if n.startswith("piece.")})
        for cut, adapter in fused.items():
            student.net.adapters[adapter_key(cut)].load_state_dict(adapter.state_dict())
        return student


def _copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().cpu().clone() for n, t in module.state_dict().items()}


def _adapter(state: dict[str, torch.Tensor], prefix: str) -> CutAdapter | None:
    weight = state.get(f"{prefix}.conv.weight")
    if weight is None:
        return None
    adapter = CutAdapter(weight.shape[1], weight.shape[0])
    adapter.load_state_dict({n[len(prefix) + 1:]: t for n, t in state.items() if n.startswith(prefix + ".")})
    return adapter
