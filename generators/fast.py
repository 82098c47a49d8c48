"""Fast synthesis (Fast-DFKD): a small generator network makes each batch in a few steps.

Plain inversion optimises every batch of pixels from noise for ~100 steps. Here a batch is
``generator(latents)``: a small conv network from per-batch latents to [0,1] images. Each
batch starts from shared *meta* weights, takes ``steps_per_batch`` Adam steps on the
generator's weights and its own latents under the inversion objective (reused from
:mod:`.inversion`), and then the meta weights move a fraction ``meta_lr`` of the way towards the
adapted ones (Reptile, a first-order meta-learning step). After a few batches the meta weights
sit where every new batch converges quickly. The BatchNorm statistics a batch must match are
blended with those of past batches (``bn_momentum``), so a batch made in few steps need not
match them alone.

Almost all of a step's cost is the teacher's forward and backward pass, so an adapted generator
is used for ``draws_per_adaptation`` batches: the adapted batch, then *redraws* that cost one
forward pass each, from latents the generator was just fitted to for the wanted class plus a
little noise (``latent_noise``). On the standard setting this gives a better student for the
same generation time than adapting for every batch (benchmarks/fast_synthesis.py, README).

The meta weights and the statistics history are state carried from batch to batch; they are
saved atomically in the output directory (``generator-state.safetensors``) after every shard
round, so a resumed run continues with them (and adapts first: redraws are not resumed). Under
torch.distributed each rank makes its own batches; the BatchNorm statistics are all-reduced at
every step, and the Reptile update is averaged over the ranks with an all-reduce, so the meta
weights stay identical on every rank; every rank counts its calls alike, so all adapt together.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from synthkd.errors import SynthkdError
from synthkd.models import Classifier
from synthkd.seeds import derive_seed
from synthkd.settings import Settings, setting

from .base import STATE_NAME, SyntheticImageGenerator, read_generator_state, write_generator_state
from .boundary import BoundarySettings, exchange_channels
from .inversion import InversionLoss, InversionLossSettings, part_of
from .registry import GENERATORS, GeneratorEntry


def _fraction_up_to_one(value: float) -> str | None:
    return None if 0 < value <= 1 else f"must be in (0, 1] (the fraction of the way to the adapted weights), got {value}"


def _fraction_below_one(value: float) -> str | None:
    return None if 0 <= value < 1 else f"must be in [0, 1), got {value}"


@dataclass
class FastSettings(Settings):
    """The meta-learned generator network (``generate --method fast``, ``distill --synthesize fast``,
    ``generate.fast`` of a run); the inversion objective's weights are separate
    (:class:`~.inversion.InversionLossSettings`)."""

    steps_per_batch: int = setting(20, at_least=1,
                                   help="Fast generator: optimisation steps per batch, from the meta-learned weights.")
    generator_lr: float = setting(0.005, positive=True,
                                  help="Fast generator: Adam learning rate on its weights within a batch.")
    latent_lr: float = setting(0.015, positive=True, help="Fast generator: Adam learning rate on each batch's latents.")
    meta_lr: float = setting(0.5, check=_fraction_up_to_one,
                             help="Fast generator: Reptile step, the fraction of the way to a batch's adapted weights.")
    bn_momentum: float = setting(0.9, check=_fraction_below_one,
                                 help="Fast generator: weight of past batches in the BN statistics a batch must match.")
    warmup_batches: int = setting(0, at_least=0,
                                  help="Fast generator: meta-learning batches before the first shard (not kept).")
    latent_dim: int = setting(128, positive=True, help="Fast generator: latent size.")
    generator_channels: int = setting(16, positive=True,
                                      help="Fast generator: width of its last conv layer (the others have twice as many).")
    draws_per_adaptation: int = setting(4, at_least=1,
                                        help="Fast generator: batches drawn from one adapted generator; after the adapted "
                                             "batch, each redraw costs one forward pass (its latents: fitted ones of the "
                                             "class plus noise).")
    latent_noise: float = setting(0.25, at_least=0, help="Fast generator: std of the noise on a redraw's latents "
                                                         "(larger: more varied, less on target).")


# How the settings are named in the manifests and generator states of sets made before the
# settings were renamed after their flags; kept so those sets still resume.
RECORDED_NAMES = {"generator_lr": "lr", "generator_channels": "channels"}


class ImageGenerator(nn.Module):
    """Latent vector -> [0,1] image of a given (C, H, W): a linear projection to a quarter of
    the size, two upsample-conv stages and a sigmoid (the generator of CMI / Fast-DFKD)."""

    def __init__(self, latent_dim: int, shape: tuple[int, int, int], channels: int = 16):
        super().__init__()
        out_channels, height, width = shape
        self.start = (math.ceil(height / 4), math.ceil(width / 4))
        wide = 2 * channels
        self.project = nn.Linear(latent_dim, wide * self.start[0] * self.start[1])
        self.body = nn.Sequential(
            nn.BatchNorm2d(wide),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(wide, wide, 3, padding=1, bias=False),
            nn.BatchNorm2d(wide),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(size=(height, width), mode="nearest"),
            nn.Conv2d(wide, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(channels, out_channels, 3, padding=1),
            nn.Sigmoid(),
        )

    EXCHANGE_AFTER = 4  # the body's layer after which hidden channels may be exchanged (first conv block)

    def forward(self, latents: torch.Tensor,
                exchange: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Images of ``latents``; ``exchange`` rewrites the hidden features after the first conv
        block (the ``exchange`` boundary technique)."""
        hidden = self.project(latents).view(len(latents), -1, *self.start)
        for index, layer in enumerate(self.body):
            hidden = layer(hidden)
            if exchange is not None and index == self.EXCHANGE_AFTER:
                hidden = exchange(hidden)
        return hidden


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class FastGenerator(SyntheticImageGenerator):
    method = "fast"

    def __init__(self, teacher: Classifier, config: FastSettings | None = None, loss: InversionLossSettings | None = None,
                 student: Classifier | None = None, seed: int = 0, boundary: BoundarySettings | None = None):
        self.settings = config or FastSettings()
        self.settings.check()
        self.teacher = teacher.eval().requires_grad_(False)
        self.objective = InversionLoss(teacher, loss or InversionLossSettings(), student,
                                       bn_momentum=self.settings.bn_momentum, boundary=boundary)
        self.shape = teacher.input_format.shape
        torch.manual_seed(seed)  # the meta weights: the same on every rank
        self.meta = ImageGenerator(self.settings.latent_dim, self.shape, self.settings.generator_channels)
        self.seed = seed
        self.batches = 0  # batches the meta weights have learned from (warm-up included)
        self.adapted: tuple[nn.Module, torch.Tensor, torch.Tensor] | None = None  # last batch: weights, latents, targets
        self.redraws_left = 0

    def config(self) -> dict[str, Any]:
        own = {RECORDED_NAMES.get(name, name): value for name, value in asdict(self.settings).items()}
        return {**self.objective.config(), **own}

    @property
    def device(self) -> torch.device:
        return next(self.teacher.parameters()).device

    def generate(self, targets: torch.Tensor, seed: int) -> torch.Tensor:
        self.meta.to(self.device)
        if self.batches == 0:
            rank = dist.get_rank() if _distributed() else 0
            for index in range(self.settings.warmup_batches):
                self.make_batch(targets, seed=derive_seed(self.seed, "fast-warmup", rank, index))
        # Every rank counts its calls alike, so all ranks adapt (and all-reduce) in the same calls.
        if self.redraws_left > 0:
            self.redraws_left -= 1
            return self.redraw(targets, seed)
        self.redraws_left = self.settings.draws_per_adaptation - 1
        return self.make_batch(targets, seed)

    def make_batch(self, targets: torch.Tensor, seed: int, steps: int | None = None, meta_step: bool = True) -> torch.Tensor:
        """Adapt a copy of the meta weights and fresh latents to ``targets`` for ``steps``
        (default ``steps_per_batch``) steps; returns the lowest-loss images and keeps the loss of
        every step in ``losses``; then (``meta_step``) moves the meta weights towards the
        adapted ones and blends the statistics history."""
        cfg = self.settings
        device = self.device
        generator = torch.Generator(device="cpu").manual_seed(seed)
        torch.manual_seed(seed)  # kornia draws its augmentation parameters from the global RNG
        targets = targets.to(device)
        aim = self.objective.aim(targets, seed)
        adapted = copy.deepcopy(self.meta).train()
        latents = torch.randn(len(targets), cfg.latent_dim, generator=generator).to(device).requires_grad_(True)
        optimizer = torch.optim.Adam(
            [{"params": adapted.parameters()}, {"params": [latents], "lr": cfg.latent_lr}], lr=cfg.generator_lr,
            betas=(0.5, 0.999),
        )
        best_loss, best_images = math.inf, torch.zeros(0, *self.shape, device=device)
        self.losses: list[float] = []
        with self.objective.hooked() as objective:
            for _ in range(steps or cfg.steps_per_batch):
                # A rank with no shard left still joins every all-reduce, with no rows.
                images = adapted(latents) if len(targets) else torch.zeros(0, *self.shape, device=device, requires_grad=True)
                loss = objective(images, aim)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                self.losses.append(loss.item())
                if loss.item() < best_loss:
                    best_loss, best_images = loss.item(), images.detach()
            if meta_step:
                objective.end_batch()
        if meta_step:
            self.reptile(adapted if len(targets) else None)
            self.adapted = (adapted, latents.detach(), targets) if len(targets) else None
        return best_images.clamp(0, 1).contiguous()

    @torch.no_grad()
    def redraw(self, targets: torch.Tensor, seed: int) -> torch.Tensor:
        """A batch from the last adapted generator at no optimisation cost: for each target, a
        latent it was fitted to for that class (any latent if the class was not in that batch)
        plus Gaussian noise of std ``latent_noise``; the generator's BatchNorm uses the batch's statistics,
        as it did while adapting."""
        if self.adapted is None or len(targets) == 0:
            return torch.zeros(len(targets), *self.shape, device=self.device)
        adapted, latents, aimed = self.adapted
        generator = torch.Generator(device="cpu").manual_seed(seed)
        targets = targets.to(aimed.device)
        matches = (aimed.unsqueeze(0) == targets.unsqueeze(1)).float()  # (wanted, fitted)
        matches[matches.sum(1) == 0] = 1.0
        picks = torch.multinomial(matches.cpu(), 1, generator=generator).squeeze(1).to(latents.device)
        noise = torch.randn(len(targets), latents.shape[1], generator=generator).to(latents.device)
        boundary = self.objective.boundary.settings
        exchange = None
        if boundary.on("exchange"):
            exchange = partial(exchange_channels, targets=targets, fraction=boundary.exchange_fraction,
                               channels=boundary.exchange_channels, seed=derive_seed(seed, "exchange"))
        return adapted(latents[picks] + self.settings.latent_noise * noise, exchange).clamp(0, 1).contiguous()

    @torch.no_grad()
    def reptile(self, adapted: nn.Module | None) -> None:
        """meta += meta_lr * mean over ranks of (adapted - meta); ranks without a batch add nothing."""
        meta_parameters = list(self.meta.parameters())
        if adapted is not None:
            deltas = [a - m for a, m in zip(adapted.parameters(), meta_parameters)]
        else:
            deltas = [torch.zeros_like(m) for m in meta_parameters]
        contributors = torch.ones(1, device=self.device) if adapted is not None else torch.zeros(1, device=self.device)
        flat = torch.cat([d.flatten() for d in deltas] + [contributors])
        if _distributed():
            dist.all_reduce(flat)
        count = float(flat[-1])
        if count > 0:
            offset = 0
            for parameter in meta_parameters:
                size = parameter.numel()
                parameter.add_(flat[offset : offset + size].view_as(parameter), alpha=self.settings.meta_lr / count)
                offset += size
        self.batches += 1

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"meta.{name}": value for name, value in self.meta.state_dict().items()}
        for index, stats in enumerate(self.objective.history or []):
            tensors[f"bn_history.{index}"] = stats
        return {**tensors, **self.objective.boundary.state_tensors()}

    def save_state(self, directory: Path) -> None:
        write_generator_state(directory, self.state_tensors(), self.config(), batches=self.batches, seed=self.seed)

    def load_state(self, directory: Path) -> None:
        state = read_generator_state(directory, self.config(), seed=self.seed)
        if state is None:
            return
        tensors, metadata = state
        path = Path(directory) / STATE_NAME
        fix = f"delete {path} to restart the generator's meta-learning (the shards already made are kept)"
        meta = {key[len("meta."):]: value for key, value in tensors.items() if key.startswith("meta.")}
        try:
            self.meta.load_state_dict(meta)
        except RuntimeError as error:
            raise SynthkdError(f"{path} does not fit this generator ({error}); {fix}") from error
        history = [tensors[f"bn_history.{i}"] for i in range(sum(k.startswith("bn_history.") for k in tensors))]
        self.objective.history = [h.to(self.device) for h in history] or None
        self.objective.boundary.load_state_tensors(tensors)
        fresh, self.batches = self.batches == 0, int(metadata.get("batches", 0))
        self.meta.to(self.device)
        if fresh and self.batches and (not _distributed() or dist.get_rank() == 0):
            print(f"synthkd: resuming the fast generator after {self.batches} batches from {path}", file=sys.stderr)


GENERATORS.add("fast", GeneratorEntry(
    build=lambda settings, teacher, competitor, seed: FastGenerator(
        teacher, settings.section(), part_of(InversionLossSettings, settings), competitor, seed,
        getattr(settings, "boundary", None)),
    summary="a meta-learned generator network, a few steps per batch",
    settings=FastSettings,
    reads=tuple(spec.name for spec in fields(InversionLossSettings)),
    techniques=("adversarial", "contrastive", "exchange", "interpolate"),
))
