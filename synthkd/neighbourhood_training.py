"""Neighbourhood distillation: every student neighbourhood learns its teacher neighbourhood
independently, from the teacher's activation at the cut before it.

Each rank owns a set of neighbourhoods (balanced by counted FLOPs); with more ranks than
neighbourhoods the extra ranks train the costliest ones data-parallel (each replica takes its
share of every batch; gradients are averaged in a process group). All ranks read the whole
training set in the same order with the same augmentations (seeded per batch), so a
neighbourhood trains identically whichever rank owns it: the same seed gives the same student
for any number of processes. The teacher runs once per batch, only as deep as the deepest
neighbourhood the rank owns, and its activations are shared by all of them. Finished
neighbourhoods are written to ``out/neighbourhoods/`` so a rerun trains only the missing ones.

Trained on an :class:`~synthkd.data.activations.ActivationDataset` instead of images, each
neighbourhood reads its own synthetic input activations (no augmentation) and its target is
the teacher neighbourhood's output on them (teacher logits for the head).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from .accelerator import log_progress, no_progress_bars
from .augment import distillation_augmentation
from .data.activations import ActivationDataset
from .errors import SynthkdError, warn
from .io import atomic_write, atomic_write_json, read_json
from .losses import DISTILLATION_LOSSES, relative_squared_error
from .models import Classifier, unwrap
from .seeds import derive_seed
from .settings import setting
from .training import KDSettings, TrainSettings, warmup_cosine
from .models.neighbourhoods import CutAdapter, attach_cut_adapters, adapter_key, cut_channel_pairs, fuse_adapters, resolve_cuts, split_network


NEIGHBOURHOOD_LR = 0.01


@dataclass
class NeighbourhoodSettings(TrainSettings, KDSettings):
    """The optimiser settings of every neighbourhood, where to cut, and the KD of the head and of
    the views. All of them key a finished neighbourhood's file, so a change retrains it."""

    cuts: str | list[str] = setting("blocks", help="Where to cut: blocks, stages, or comma-separated module paths.")
    # Each neighbourhood is a regression onto teacher activations; Adam fits it several times
    # faster than SGD (stem relative MSE 0.23 vs 0.44 after 200 steps on Fashion-MNIST).
    optimizer: Literal["adam", "sgd"] = setting("adam", help="Optimiser of every neighbourhood.")
    lr: float = setting(NEIGHBOURHOOD_LR, help="Learning rate of every neighbourhood.", positive=True)
    holdout: int = setting(512, help="Training images kept aside to measure each neighbourhood's local error.",
                           at_least=0)


class StudentNeighbourhood(nn.Module):
    """A student piece with optional 1x1 adapters from/to the teacher's channels at its cuts."""

    def __init__(self, piece: nn.Module, in_adapter: CutAdapter | None, out_adapter: CutAdapter | None):
        super().__init__()
        self.piece = piece
        self.in_adapter = in_adapter
        self.out_adapter = out_adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_adapter is not None:
            x = self.in_adapter(x)
        x = self.piece(x)
        return self.out_adapter(x) if self.out_adapter is not None else x


def balance(costs: list[float], num_ranks: int) -> list[list[int]]:
    """Longest-processing-time-first assignment of neighbourhoods to ranks (deterministic)."""
    loads = [0.0] * num_ranks
    owned: list[list[int]] = [[] for _ in range(num_ranks)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(num_ranks), key=lambda r: (loads[r], r))
        loads[rank] += costs[index]
        owned[rank].append(index)
    return [sorted(o) for o in owned]


def replicate(assignment: list[list[int]], costs: list[float]) -> list[list[int]]:
    """Ranks of each neighbourhood. With more ranks than neighbourhoods the extra (empty) ranks
    join the neighbourhood with the highest cost per rank, which then trains data-parallel."""
    ranks = [[] for _ in costs]
    for rank, owned in enumerate(assignment):
        for index in owned:
            ranks[index].append(rank)
    for rank, owned in enumerate(assignment):
        if not owned and costs:
            index = max(range(len(costs)), key=lambda i: (costs[i] / len(ranks[i]), -i))
            ranks[index].append(rank)
    return ranks


def count_flops(module: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``x``, counted wherever the module's weights are."""
    weight = next(module.parameters(), None)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x if weight is None else x.to(weight.device))
    return counter.get_total_flops()


class NeighbourhoodDistiller:
    """Trains the neighbourhoods of ``student`` against the teacher's.

    By default every rank builds the same plan and the neighbourhoods are spread over the ranks
    (:meth:`train` is then collective). With ``owned`` this process alone trains exactly those
    neighbourhoods and :meth:`train` makes no collective call: the caller spreads the work, as
    Student Search does with the neighbourhoods of many candidate students."""

    HEAD_LOSS = "kd"   # names in DISTILLATION_LOSSES
    CUT_LOSS = "mse"

    def __init__(self, teacher: Classifier, student: Classifier, config: NeighbourhoodSettings, accelerator: Accelerator,
                 owned: list[int] | None = None, phase: str = "neighbourhoods"):
        """``phase`` names the per-epoch records in the log and the trackers."""
        self.teacher = teacher.eval().requires_grad_(False)
        self.phase = phase
        self.student = student
        # The student's starting weights, not just its config: a model directory given as the
        # student is a starting point, and another one of the same architecture must retrain.
        self.student_fingerprint = student.fingerprint()
        self.config = config
        self.accelerator = accelerator
        self.cuts = resolve_cuts(unwrap(teacher.net), config.cuts)
        student_cuts = resolve_cuts(unwrap(student.net), self.cuts)
        self.teacher_split = split_network(teacher.net, self.cuts)
        self.student_split = split_network(student.net, student_cuts)
        fmt = teacher.input_format
        # The probes run on the teacher's device (Student Search hands over a teacher already on
        # the GPU), so the student joins it there.
        device = next(teacher.parameters()).device
        probe = fmt.normalize(torch.rand(2, *fmt.shape, generator=torch.Generator().manual_seed(0))).to(device)
        student.to(device).eval()
        self.channel_pairs = cut_channel_pairs(self.teacher_split, self.student_split, probe)
        self.neighbourhoods = nn.ModuleList()
        for k, piece in enumerate(self.student_split.pieces):
            torch.manual_seed(derive_seed(config.seed, "adapters", k))  # the same on every rank
            before = self.channel_pairs[k - 1] if k > 0 else None
            after = self.channel_pairs[k]
            self.neighbourhoods.append(StudentNeighbourhood(
                piece,
                CutAdapter(before[0], before[1]) if before else None,
                CutAdapter(after[1], after[0]) if after else None,
            ).to(device))
        inputs = [probe]
        for piece in self.teacher_split.pieces[:-1]:
            with torch.no_grad():
                inputs.append(piece(inputs[-1]))
        self.flops = [count_flops(n, x) for n, x in zip(self.neighbourhoods, inputs)]
        self.activation_inputs = False  # set by train() for an ActivationDataset
        self.local = owned is not None
        if self.local:
            self.owned = sorted(owned)
            self.ranks = [[accelerator.process_index] if k in self.owned else [] for k in range(len(self.neighbourhoods))]
            self.groups = {}
        else:
            costs = [float(f) for f in self.flops]
            self.assignment = balance(costs, accelerator.num_processes)
            self.ranks = replicate(self.assignment, costs)
            self.owned = [k for k, ranks in enumerate(self.ranks) if accelerator.process_index in ranks]
            # Every rank creates every group, in the same order, as torch.distributed requires.
            self.groups = {k: torch.distributed.new_group(ranks) for k, ranks in enumerate(self.ranks) if len(ranks) > 1}

    @property
    def names(self) -> list[str]:
        return self.student_split.names

    def fingerprint(self, data_fingerprint: str) -> str:
        """Key of a finished neighbourhood file: teacher, student, cuts, data and settings."""
        payload = json.dumps({
            "teacher": self.teacher.fingerprint(), "student": self.student_fingerprint,
            "config": asdict(self.config), "cuts": self.cuts, "data": data_fingerprint,
        }, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def train(self, dataset: Dataset, out: Path, data_fingerprint: str) -> dict[str, Any]:
        """Train the owned neighbourhoods (or load finished ones) and gather all of them on every
        rank; :meth:`merge` then makes the student."""
        accelerator, config = self.accelerator, self.config
        device = accelerator.device
        self.activation_inputs = isinstance(dataset, ActivationDataset)
        if self.activation_inputs and dataset.cuts != self.cuts:
            raise SynthkdError(
                f"the activation set was made for cuts {dataset.cuts}, this run cuts at {self.cuts}; "
                "pass the same --cuts to `synthkd distill` as to `synthkd generate --method activations`"
            )
        self.teacher.to(device)
        self.neighbourhoods.to(device)
        key = self.fingerprint(data_fingerprint)
        folder = out / "neighbourhoods"
        holdout = min(config.holdout, len(dataset) // 5)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed)).tolist()
        train_set, held_out = Subset(dataset, order[holdout:]), Subset(dataset, order[:holdout])
        todo, results = [], {}
        for k in self.owned:
            finished = self._load_finished(folder, k, key)
            if finished is not None:
                results[k] = finished
            else:
                todo.append(k)
        if todo:
            results.update(self._train(todo, train_set, held_out, folder, key))
        if self.local:
            gathered = [(k, None, results[k]) for k in self.owned]  # the weights are in place already
        else:
            leader = [k for k in self.owned if self.ranks[k][0] == self.accelerator.process_index]
            gathered = gather_object([(k, {n: t.cpu() for n, t in self.neighbourhoods[k].state_dict().items()}, results[k])
                                      for k in leader])
        metrics = {}
        for k, state, record in sorted(gathered, key=lambda item: item[0]):
            if state is not None:
                self.neighbourhoods[k].load_state_dict(state)
            metrics[self.names[k]] = record
        self.neighbourhoods.cpu()
        processes = [self.accelerator.process_index] if self.local else range(self.accelerator.num_processes)
        return {"neighbourhoods": metrics, "assignment": {str(r): [self.names[k] for k, ranks in enumerate(self.ranks) if r in ranks]
                                                          for r in processes},
                "flops": dict(zip(self.names, self.flops))}

    def _load_finished(self, folder: Path, k: int, key: str) -> dict[str, Any] | None:
        weights, record = folder / f"{k:02d}.safetensors", folder / f"{k:02d}.json"
        if not (weights.is_file() and record.is_file()):
            return None
        try:
            meta = read_json(record)
            if meta.get("key") != key:
                return None
            state = load_file(str(weights))
        except Exception as error:  # a truncated or overwritten file: any parse error
            warn(f"the finished neighbourhood {self.names[k]!r} in {folder} is corrupt ({error}); training it again")
            return None
        current = self.neighbourhoods[k].state_dict()
        if state.keys() != current.keys() or any(state[n].shape != current[n].shape for n in state):
            return None  # from another student: train it again
        self.neighbourhoods[k].load_state_dict(state)
        return {**meta["metrics"], "resumed": True}

    def _teacher_activations(self, images: torch.Tensor, depth: int) -> list[torch.Tensor]:
        """Input and outputs of the teacher's neighbourhoods 0..depth (shared by owned pieces)."""
        fmt = self.teacher.input_format
        activations = [fmt.normalize(fmt.adapt(images))]
        with torch.no_grad():
            for piece in self.teacher_split.pieces[: depth + 1]:
                # A piece may start with an in-place op (a ReLU(inplace=True) after a cut at a
                # BatchNorm): on a clone, so it cannot overwrite the previous piece's target,
                # which would then depend on how deep this rank runs the teacher.
                activations.append(piece(activations[-1].clone()))
        return activations

    @torch.no_grad()
    def _pairs(self, batch, indices: list[int], augment: nn.Module | None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """(input, teacher target) of each neighbourhood in ``indices`` for one batch: from the
        teacher run on the (augmented) images, or from each neighbourhood's own activations."""
        device = self.accelerator.device
        if self.activation_inputs:
            inputs = {k: batch[k].to(device) for k in indices}
            return {k: (x, self.teacher_split.pieces[k](x.clone())) for k, x in inputs.items()}
        images = batch.images.to(device)
        activations = self._teacher_activations(augment(images) if augment is not None else images, max(indices))
        return {k: (activations[k], activations[k + 1]) for k in indices}

    def _loss(self, k: int, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """KD on the head's logits, a regression onto the teacher's activation at every other cut."""
        name = self.HEAD_LOSS if k == len(self.neighbourhoods) - 1 else self.CUT_LOSS
        return DISTILLATION_LOSSES.get(name)(output.float(), target.float(), self.config.temperature)

    def _train(self, todo: list[int], train_set: Dataset, held_out: Dataset, folder: Path, key: str) -> dict[int, dict]:
        config, accelerator = self.config, self.accelerator
        fmt = self.teacher.input_format
        augment = distillation_augmentation(fmt.height, fmt.width, config.flip, config.mixup).to(accelerator.device)
        steps_per_epoch = len(train_set) // config.batch_size or 1
        optimizers = {k: self._optimizer(self.neighbourhoods[k]) for k in todo}
        schedulers = {k: warmup_cosine(optimizers[k], config, steps_per_epoch) for k in todo}
        seconds = {k: 0.0 for k in todo}
        for k in todo:
            self.neighbourhoods[k].train()
        bar = tqdm(total=config.epochs * steps_per_epoch, desc=f"neighbourhoods (rank {accelerator.process_index})",
                   disable=no_progress_bars(accelerator), leave=False)
        for epoch in range(config.epochs):
            loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, drop_last=len(train_set) > config.batch_size,
                                generator=torch.Generator().manual_seed(derive_seed(config.seed, "epoch", epoch)))
            losses = {k: torch.zeros((), device=accelerator.device) for k in todo}
            for step, batch in enumerate(loader):
                torch.manual_seed(derive_seed(config.seed, "epoch", epoch, "step", step))  # same views on every rank
                pairs = self._pairs(batch, todo, augment)
                for k in todo:
                    started = time.perf_counter()
                    losses[k] += self._step(k, pairs[k], optimizers[k], schedulers[k])
                    seconds[k] += time.perf_counter() - started
                bar.update(1)
            log_progress(accelerator, self.phase,
                         {"epoch": epoch + 1, **{f"{self.names[k]}/loss": (losses[k] / max(1, len(loader))).item() for k in todo}})
        bar.close()
        return self._save_trained(todo, held_out, folder, key, seconds)

    def _step(self, k: int, pair: tuple[torch.Tensor, torch.Tensor], optimizer: torch.optim.Optimizer, scheduler) -> torch.Tensor:
        """One optimiser step of neighbourhood k on this rank's share of the batch; its loss (detached)."""
        rows = self._rows(k)
        with self.accelerator.autocast():
            output = self.neighbourhoods[k](pair[0][rows])
            loss = self._loss(k, output, pair[1][rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._average_gradients(k)
        optimizer.step()
        scheduler.step()
        return loss.detach().float()

    def _save_trained(self, todo: list[int], held_out: Dataset, folder: Path, key: str,
                      seconds: dict[int, float]) -> dict[int, dict]:
        """The records of the trained neighbourhoods (local error on ``held_out``), each written
        with its weights by the rank that leads it."""
        accelerator = self.accelerator
        results = {}
        errors = self.local_errors(todo, held_out)
        for k in todo:
            results[k] = {"relative_mse": errors[k], "seconds": seconds[k], "flops": self.flops[k],
                          "rank": accelerator.process_index, "ranks": self.ranks[k], "epochs": self.config.epochs}
            if self.ranks[k][0] != accelerator.process_index:
                continue  # a data-parallel replica: its leader writes the files
            state = {n: t.detach().cpu().contiguous() for n, t in self.neighbourhoods[k].state_dict().items()}
            atomic_write(folder / f"{k:02d}.safetensors", lambda tmp, state=state: save_file(state, tmp))
            atomic_write_json(folder / f"{k:02d}.json", {"key": key, "name": self.names[k], "metrics": results[k]})
        return results

    def _optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        config = self.config
        if config.optimizer == "adam":
            return torch.optim.Adam(module.parameters(), lr=config.lr)
        if config.optimizer == "sgd":
            return torch.optim.SGD(module.parameters(), lr=config.lr, momentum=config.momentum,
                                   weight_decay=config.weight_decay, nesterov=True)
        raise SynthkdError(f"unknown neighbourhood optimizer {config.optimizer!r}; use adam or sgd")

    def _rows(self, k: int) -> slice:
        """This rank's share of a batch for neighbourhood k (all of it unless replicated)."""
        ranks = self.ranks[k]
        return slice(ranks.index(self.accelerator.process_index), None, len(ranks))

    def _average_gradients(self, k: int) -> None:
        if k not in self.groups:
            return
        size = len(self.ranks[k])
        for parameter in self.neighbourhoods[k].parameters():
            if parameter.grad is not None:
                torch.distributed.all_reduce(parameter.grad, group=self.groups[k])
                parameter.grad.div_(size)

    @torch.no_grad()
    def local_errors(self, indices: list[int], held_out: Dataset) -> dict[int, float]:
        """Relative MSE ||s_k - t_k||^2 / ||t_k||^2 of each neighbourhood on held-out inputs
        (for the head: on logits)."""
        error = {k: 0.0 for k in indices}
        norm = {k: 0.0 for k in indices}
        for k in indices:
            self.neighbourhoods[k].eval()
        for batch in DataLoader(held_out, batch_size=256):
            pairs = self._pairs(batch, indices, augment=None)
            for k in indices:
                squared_error, squared_norm = relative_squared_error(self.neighbourhoods[k](pairs[k][0]).float(), pairs[k][1])
                error[k] += squared_error
                norm[k] += squared_norm
        return {k: error[k] / max(norm[k], 1e-12) for k in indices}

    def merge(self) -> Classifier:
        """The student made of the trained neighbourhoods. The pieces hold the student's own
        modules, so only each cut's adapter pair is left to fuse into one 1x1 convolution."""
        channels, fused = {}, {}
        for k, cut in enumerate(self.cuts):
            if self.channel_pairs[k] is None:
                continue
            channels[cut] = self.channel_pairs[k][1]
            fused[cut] = fuse_adapters(self.neighbourhoods[k].out_adapter, self.neighbourhoods[k + 1].in_adapter)
        if not channels:
            return self.student
        net = unwrap(self.student.net)
        attach_cut_adapters(net, channels)
        for cut, adapter in fused.items():
            net.cut_adapters[adapter_key(cut)].load_state_dict(adapter.state_dict())
        self.student.config.cut_adapters = channels
        return self.student
