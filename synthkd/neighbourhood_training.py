"""Neighbourhood distillation: every student neighbourhood learns its teacher neighbourhood
independently, from the teacher's activation at the cut before it to the one after it.

The teacher runs once: its activation at every cut, for every image and ``cache_views`` views
of it, is computed up front (in memory, or as a checksummed, resumable cache on disk,
:mod:`synthkd.data.activation_cache`), and each neighbourhood then trains on (input, target)
pairs read from it, with no teacher forward pass. A student keeps the teacher's activation
shape at every cut (e.g. ``resnet20:inner=0.5``: thinner inside each block, same residual
width), so the pieces chain without adapters and the merged student is the student network
itself. A student born from the teacher by pruning (``teacher:width=0.5``) is narrower at the
cuts but its channels there are teacher channels: neighbourhood k learns the teacher's activation
at cut k-1 restricted to the channels kept there to the one at cut k restricted to the same, and
the pieces chain with nothing learned at the cuts. ``adapters`` allows other narrower interfaces
with learned 1x1 convolutions between them.

Each rank owns a set of neighbourhoods (balanced by counted FLOPs) and reads only their
activations; with more ranks than neighbourhoods the extra ranks train the costliest ones
data-parallel (each replica takes its share of every batch; gradients are averaged in a
process group). A neighbourhood's batches depend only on the seed and its index, so the same
seed gives the same student for any number of processes. Finished neighbourhoods are written
to ``out/neighbourhoods/`` so a rerun trains only the missing ones.

Trained on an :class:`~synthkd.data.activations.ActivationDataset` instead of images, each
neighbourhood reads its own synthetic input activations and its target is the teacher
neighbourhood's output on them (teacher logits for the head).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from .accelerator import log_progress, progress_bar, synchronize, training_memory_format
from .data.activations import ActivationDataset
from .errors import SynthkdError, warn
from .io import atomic_write, atomic_write_json, read_json
from .losses import DISTILLATION_LOSSES, relative_squared_error
from .models import Classifier, unwrap
from .models.born import count_flops, kept_channels_at
from .seeds import derive_seed
from .settings import directory_problem, setting
from .training import KDSettings, TrainSettings, warmup_cosine
from .models.neighbourhoods import (CutAdapter, activation_shapes, adapter_key, attach_cut_adapters, cut_channel_pairs,
                                    evaluating, fuse_adapters, resolve_cuts, split_network)
from .teacher_activations import TeacherActivations


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
    adapters: bool = setting(False, help="Allow a student with fewer channels than the teacher at a cut: learned 1x1 "
                                         "convolutions map between them (less accurate than a student that keeps "
                                         "the teacher's interfaces, e.g. resnet20:inner=0.5).")
    cache: Literal["auto", "memory", "disk"] = setting(
        "auto", help="Where the teacher's activations live: memory, disk (a resumable cache directory), or auto "
                     "(memory when they take under a quarter of the free memory).")
    cache_dir: str | None = setting(None, check=directory_problem,
                                    help="Disk cache directory (default: OUT/activation-cache); a cache of another "
                                         "teacher, set, cut list or views is refused.")
    cache_views: int = setting(1, positive=True, help="Views of every image in the cache: the image as made, then "
                                                      "views-1 augmented ones (pad-and-crop, --flip, --mixup).")
    cache_dtype: Literal["float32", "float16"] = setting("float32", help="Precision of the stored activations.")

    def key(self) -> dict[str, Any]:
        """The settings that decide a trained neighbourhood (not where its inputs are kept)."""
        return {name: value for name, value in asdict(self).items() if name not in ("cache", "cache_dir")}


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


def batch_of(probe: torch.Tensor, batch: int) -> torch.Tensor:
    """A batch of ``batch`` copies of a probe's first row, to time a piece on."""
    return probe[:1].expand(batch, *probe.shape[1:]).contiguous()


def best_seconds(run: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """The fastest of ``repeats`` calls of ``run`` on ``device``: the first one warms caches and
    allocators."""
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


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
        self.kept_channels = self._kept_channels(student_cuts, probe)
        # A cut whose channels are the teacher's kept ones needs no adapter.
        self.channel_pairs = [None if kept else pair for pair, kept in zip(self.channel_pairs, self.kept_channels + [None])]
        if not config.adapters:
            self._require_same_interfaces(probe)
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
        # The teacher's activation entering each neighbourhood, on the probe, whole and as the
        # student's piece takes it (the kept channels).
        self.teacher_probes = [probe]
        for piece in self.teacher_split.pieces[:-1]:
            with torch.no_grad():
                self.teacher_probes.append(piece(self.teacher_probes[-1]))
        self.probes = [x if kept is None else x[:, kept] for x, kept in zip(self.teacher_probes, [None] + self.kept_channels)]
        self.flops = [count_flops(n, x) for n, x in zip(self.neighbourhoods, self.probes)]
        self.local = owned is not None
        if self.local:
            self.owned = sorted(owned)
            self.ranks = [[accelerator.process_index] if k in self.owned else [] for k in range(len(self.neighbourhoods))]
            self.groups = {}
        else:
            costs = self.step_costs(config.batch_size) if accelerator.num_processes > 1 else [float(f) for f in self.flops]
            self.assignment = balance(costs, accelerator.num_processes)
            self.ranks = replicate(self.assignment, costs)
            self.owned = [k for k, ranks in enumerate(self.ranks) if accelerator.process_index in ranks]
            # Every rank creates every group, in the same order, as torch.distributed requires.
            self.groups = {k: torch.distributed.new_group(ranks) for k, ranks in enumerate(self.ranks) if len(ranks) > 1}

    @property
    def names(self) -> list[str]:
        return self.student_split.names

    def step_costs(self, batch: int, repeats: int = 3) -> list[float]:
        """Seconds of one training step (forward and backward) of every neighbourhood on a batch
        of its input shape, timed by the main process and shared (so every rank makes the same
        assignment). Counted FLOPs mislead here: a block on large feature maps takes 2.5x the time
        of one with the same FLOPs on small ones (memory traffic), which left one rank 12% over
        its share."""
        costs: list[Any] = [None]
        if self.accelerator.is_main_process:
            timed = []
            with evaluating(*self.neighbourhoods):  # timing must not move BatchNorm statistics
                for neighbourhood, probe in zip(self.neighbourhoods, self.probes):
                    x = batch_of(probe, batch)
                    timed.append(best_seconds(lambda: neighbourhood(x).float().pow(2).mean().backward(), repeats, x.device))
                    neighbourhood.zero_grad(set_to_none=True)
            costs = [timed]
        broadcast_object_list(costs)
        return costs[0]

    def _kept_channels(self, student_cuts: list[str], probe: torch.Tensor) -> list[list[int] | None]:
        """Per cut, the teacher's indices of the channels a student born from this teacher keeps
        there (None where it keeps all of them, or was not born from this teacher)."""
        born = self.student.config.born_from
        if not born or born.get("teacher") != self.teacher.fingerprint():
            return [None] * len(self.cuts)
        found = kept_channels_at(unwrap(self.student.net), born["channels"], student_cuts, probe)
        kept: list[list[int] | None] = []
        for name, student_cut, pair in zip(self.cuts, student_cuts, self.channel_pairs):
            channels = found.get(student_cut)
            if pair is None:
                kept.append(None)
            elif channels is None or len(channels) != pair[1]:
                raise SynthkdError(
                    f"cannot tell which of the teacher's {pair[0]} channels the born student's {pair[1]} at cut {name!r} "
                    "are; choose cuts after pruned modules (e.g. --cuts blocks), or pass --adapters to learn 1x1 "
                    "convolutions between them")
            else:
                kept.append(channels)
        return kept

    def _require_same_interfaces(self, probe: torch.Tensor) -> None:
        """Without adapters every cut must carry the teacher's activation shape."""
        for name, pair, t, s in zip(self.names, self.channel_pairs, activation_shapes(self.teacher_split, probe),
                                    activation_shapes(self.student_split, probe)):
            if pair is not None:
                born = self.student.config.born_from
                why = " (it was born from another teacher, so its channels are not this one's)" if born else ""
                raise SynthkdError(
                    f"the student's activation at cut {name!r} is {s}, the teacher's {t}{why}; a neighbourhood student "
                    "keeps the teacher's interfaces (e.g. --student resnet20:inner=0.5) or its kept channels "
                    "(--student teacher:width=0.5), or pass --adapters to learn 1x1 convolutions between them")

    def fingerprint(self, data_fingerprint: str) -> str:
        """Key of a finished neighbourhood file: teacher, student, cuts, data and settings."""
        payload = json.dumps({
            "teacher": self.teacher.fingerprint(), "student": self.student_fingerprint,
            "config": self.config.key(), "cuts": self.cuts, "data": data_fingerprint,
        }, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def train(self, dataset: Dataset, out: Path, data_fingerprint: str,
              activations: TeacherActivations | None = None) -> dict[str, Any]:
        """Train the owned neighbourhoods (or load finished ones) and gather all of them on every
        rank; :meth:`merge` then makes the student. ``activations``: the teacher's, when the
        caller shares them between several students (Student Search)."""
        accelerator = self.accelerator
        if isinstance(dataset, ActivationDataset) and dataset.cuts != self.cuts:
            raise SynthkdError(
                f"the activation set was made for cuts {dataset.cuts}, this run cuts at {self.cuts}; "
                "pass the same --cuts to `synthkd distill` as to `synthkd generate --method activations`"
            )
        self.neighbourhoods.to(accelerator.device)
        key = self.fingerprint(data_fingerprint)
        folder = out / "neighbourhoods"
        todo, results = [], {}
        for k in self.owned:
            finished = self._load_finished(folder, k, key)
            if finished is not None:
                results[k] = finished
            else:
                todo.append(k)
        started, cpu_started = time.perf_counter(), time.process_time()
        if activations is None and (todo or not self.local):  # the cache build is collective
            activations = TeacherActivations(self.teacher, self.teacher_split, dataset, self.config, data_fingerprint,
                                              accelerator, out, needed=todo, local=self.local, kept=self.kept_channels)
        cache_seconds, cache_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        if todo:
            results.update(self._train(todo, activations, folder, key))
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
        report = {"neighbourhoods": metrics, "flops": dict(zip(self.names, self.flops)),
                  "assignment": {str(r): [self.names[k] for k, ranks in enumerate(self.ranks) if r in ranks] for r in processes}}
        if activations is not None:
            report["activation_cache"] = {**activations.summary, "seconds": cache_seconds, "cpu_seconds": cache_cpu_seconds}
        return report

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

    def _loss(self, k: int, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """KD on the head's logits, a regression onto the teacher's activation at every other cut."""
        name = self.HEAD_LOSS if k == len(self.neighbourhoods) - 1 else self.CUT_LOSS
        return DISTILLATION_LOSSES.get(name)(output.float(), target.float(), self.config.temperature)

    def _train(self, todo: list[int], activations: TeacherActivations, folder: Path, key: str) -> dict[int, dict]:
        """Each neighbourhood in turn, on its own (input, target) pairs: its batches depend only
        on the seed and its index, never on which rank trains it or what else that rank owns."""
        config, device = self.config, self.accelerator.device
        results = {}
        bar = progress_bar(self.accelerator, total=len(todo) * config.epochs,
                           desc=f"neighbourhoods (rank {self.accelerator.process_index})", leave=False)
        for k in todo:
            inputs, targets = activations.pair(k)
            train_rows, held_out = activations.train_rows, activations.holdout_rows
            layout = training_memory_format(device) if inputs.ndim == 4 else torch.contiguous_format
            neighbourhood = self.neighbourhoods[k].train().to(memory_format=layout)
            optimizer = self._optimizer(neighbourhood)
            steps_per_epoch = max(1, len(train_rows) // config.batch_size)
            scheduler = warmup_cosine(optimizer, config, steps_per_epoch)
            started, cpu_started = time.perf_counter(), time.process_time()
            for epoch in range(config.epochs):
                order = train_rows[torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(
                    derive_seed(config.seed, "neighbourhood", k, "epoch", epoch)))]
                loss = torch.zeros((), device=device)
                for step in range(steps_per_epoch):
                    rows = order[step * config.batch_size : (step + 1) * config.batch_size]
                    batch = inputs[rows].to(device).float().contiguous(memory_format=layout)
                    loss += self._step(k, (batch, targets[rows].to(device).float()), optimizer, scheduler)
                bar.update(1)
                log_progress(self.accelerator, self.phase, {"epoch": epoch + 1, f"{self.names[k]}/loss": (loss / steps_per_epoch).item()})
            neighbourhood.to(memory_format=torch.contiguous_format)
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
            error = self._local_error(k, inputs[held_out], targets[held_out])
            results[k] = {"relative_mse": error, "seconds": seconds, "cpu_seconds": cpu_seconds, "flops": self.flops[k],
                          "rank": self.accelerator.process_index, "ranks": self.ranks[k], "epochs": config.epochs}
            self._save(k, folder, key, results[k])
        bar.close()
        return results

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

    def _save(self, k: int, folder: Path, key: str, record: dict[str, Any]) -> None:
        """Write a trained neighbourhood's weights and record (by the rank that leads it)."""
        if self.ranks[k][0] != self.accelerator.process_index:
            return  # a data-parallel replica: its leader writes the files
        state = {n: t.detach().cpu().contiguous() for n, t in self.neighbourhoods[k].state_dict().items()}
        atomic_write(folder / f"{k:02d}.safetensors", lambda tmp: save_file(state, tmp))
        atomic_write_json(folder / f"{k:02d}.json", {"key": key, "name": self.names[k], "metrics": record})

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
    def _local_error(self, k: int, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Relative MSE ||s_k - t_k||^2 / ||t_k||^2 of neighbourhood k on held-out pairs (for the
        head: on logits)."""
        neighbourhood = self.neighbourhoods[k].eval()
        device = self.accelerator.device
        error = norm = 0.0
        for start in range(0, len(inputs), 256):
            target = targets[start : start + 256].to(device).float()
            squared_error, squared_norm = relative_squared_error(
                neighbourhood(inputs[start : start + 256].to(device).float()).float(), target)
            error, norm = error + squared_error, norm + squared_norm
        return error / max(norm, 1e-12)

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
