"""Techniques that aim synthetic samples at the teacher's decision boundaries, as options of the
inverting generators (inversion, fast, and the fast generator of ``distill --synthesize``).

A set made by matching BatchNorm statistics and a cross-entropy to one class is made of class
prototypes: the student learns them and still fails where classes meet (on the standard setting
the synthetic Shirts are prototypes the student gets right while it gets a third of the real
Shirts). Each technique here is one answer from the literature, off unless named in
``BoundarySettings.techniques``; all weights live in :class:`BoundarySettings` and the loss terms
in :mod:`synthkd.losses`:

- ``adversarial`` (CMI, Fast-DFKD): minus the KD divergence on the samples student and teacher
  agree on, so new samples go where the student still disagrees; needs a student.
- ``contrastive`` (CMI): instance discrimination of the teacher's penultimate features against a
  memory bank of earlier samples' features, so the set keeps spreading.
- ``exchange`` (after SpaceshipNet's channel-wise feature exchange): redraws of the fast generator
  swap a share of hidden channels with a sample of another class, a free cross-class sample.
- ``interpolate``: part of each batch is aimed between a class and the class the teacher's
  classifier weights say it is most like (soft target), i.e. at their boundary.
- ``replay``: the interleaved student trains half of each epoch on the newest samples and half on
  a bounded memory of older ones (``pipelines/interleave.py``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from synthkd.detector.features import default_layer
from synthkd.errors import SynthkdError
from synthkd.losses import agreement_masked_adversarial, instance_discrimination
from synthkd.models import Classifier
from synthkd.settings import Settings, setting, show

TECHNIQUES = {
    "adversarial": "minus the KD divergence where student and teacher agree (needs a student)",
    "contrastive": "instance discrimination of teacher features against a memory bank",
    "exchange": "fast generator redraws swap hidden channels with a sample of another class",
    "interpolate": "part of each batch aimed between the two classes the teacher confuses most",
    "replay": "interleaved student: newest samples plus a replayed memory of older ones",
}
NEEDS_STUDENT = ("adversarial",)
STUDENT_SIDE = ("replay",)  # techniques of the interleaved student's training, not of a generator


def _fraction(value: float) -> str | None:
    return None if 0 <= value <= 1 else f"must be in [0, 1], got {show(value)}"


def _aimed_share(value: float) -> str | None:
    return None if 0.5 <= value < 1 else f"must be in [0.5, 1) (the aimed class keeps the larger share), got {show(value)}"


@dataclass
class BoundarySettings(Settings):
    """Which boundary techniques are on and their weights (``--techniques a,b`` and the flags
    below; ``boundary:`` of ``generate`` in a run file)."""

    techniques: list[str] = setting(default_factory=list, choices=TECHNIQUES,
                                    help="Boundary techniques: " + "; ".join(
                                        f"{name}: {what}" for name, what in TECHNIQUES.items()) + ".")
    adversarial_weight: float = setting(1.0, at_least=0, help="adversarial: weight of the agreement-masked -KD term.")
    contrastive_weight: float = setting(0.5, at_least=0, help="contrastive: weight of the instance-discrimination term.")
    contrastive_temperature: float = setting(0.1, positive=True, help="contrastive: temperature of its similarities.")
    bank_size: int = setting(4096, positive=True, help="contrastive: teacher features of earlier samples kept as negatives.")
    exchange_fraction: float = setting(0.5, check=_fraction, help="exchange: share of each redrawn batch made by exchange.")
    exchange_channels: float = setting(0.5, check=_fraction, help="exchange: share of hidden channels taken from the partner.")
    interpolate_fraction: float = setting(0.25, check=_fraction,
                                          help="interpolate: share of each batch aimed between two classes.")
    interpolate_weight: float = setting(0.6, check=_aimed_share,
                                        help="interpolate: the aimed class's share of the soft target (the rest goes "
                                             "to its most similar class).")
    replay_newest: float = setting(0.5, check=_fraction,
                                   help="replay: share of each interleaved epoch drawn from the newest round's samples.")
    replay_size: int = setting(8192, positive=True, help="replay: older samples kept in the replay memory.")

    def on(self, name: str) -> bool:
        return name in self.techniques

    @property
    def active(self) -> bool:
        return bool(self.techniques)

    def generator_techniques(self) -> list[str]:
        return [name for name in self.techniques if name not in STUDENT_SIDE]

    def record(self) -> dict[str, Any]:
        """What a set records of these settings: the techniques and the weights they read."""
        prefixes = {"adversarial": ("adversarial_",), "contrastive": ("contrastive_", "bank_"),
                    "exchange": ("exchange_",), "interpolate": ("interpolate_",), "replay": ("replay_",)}
        wanted = [p for name in self.techniques for p in prefixes[name]]
        return {key: value for key, value in asdict(self).items()
                if key == "techniques" or any(key.startswith(p) for p in wanted)}


def method_problems(settings: BoundarySettings, method: str, supported: tuple[str, ...]) -> list[str]:
    """Why ``method`` cannot use the techniques asked for (one phrase each), for settings checks."""
    problems = []
    for name in settings.techniques:
        if name in STUDENT_SIDE:
            problems.append(f"{name} trains the interleaved student: use it with `distill --synthesize fast`")
        elif name in TECHNIQUES and name not in supported:
            problems.append(f"{name} does not work with --method {method} (it takes: {', '.join(supported) or 'none'})")
    return problems


def confusable_partners(teacher: Classifier) -> torch.Tensor:
    """For every class, the other class whose weight vector in the teacher's last linear layer is
    most similar (cosine): the class the teacher's features confuse it with most, known without
    data (the class similarity of Zero-Shot KD, Nayak et al. 2019)."""
    linear = dict(teacher.net.named_modules())[default_layer(teacher)]
    weights = F.normalize(linear.weight.detach().float(), dim=1)
    similarity = weights @ weights.T
    similarity.fill_diagonal_(-2.0)
    return similarity.argmax(1).cpu()


def interpolation_targets(targets: torch.Tensor, partners: torch.Tensor, num_classes: int, fraction: float,
                          aimed_share: float, seed: int) -> torch.Tensor:
    """Soft targets (N x classes): one-hot, except a ``fraction`` of the rows (chosen by ``seed``),
    which give ``aimed_share`` to their class and the rest to its partner class."""
    generator = torch.Generator().manual_seed(seed)
    cpu = targets.cpu()
    soft = F.one_hot(cpu, num_classes).float()
    between = torch.rand(len(cpu), generator=generator) < fraction
    rows = torch.nonzero(between).flatten()
    soft[rows] = 0.0
    soft[rows, cpu[rows]] = aimed_share
    soft[rows, partners[cpu[rows]]] += 1.0 - aimed_share
    return soft.to(targets.device)


def exchange_channels(features: torch.Tensor, targets: torch.Tensor, fraction: float, channels: float,
                      seed: int) -> torch.Tensor:
    """``features`` (N x C x H x W) where a ``fraction`` of the samples take a ``channels`` share of
    their channels from a partner of another target class (chosen by ``seed``); unchanged rows
    where no other class is present."""
    generator = torch.Generator().manual_seed(seed)
    count, width = features.shape[:2]
    cpu = targets.cpu()
    chosen = torch.nonzero(torch.rand(count, generator=generator) < fraction).flatten()
    mixed = features.clone()
    for row in chosen.tolist():
        others = torch.nonzero(cpu != cpu[row]).flatten()
        if len(others) == 0:
            continue
        partner = int(others[torch.randint(len(others), (1,), generator=generator)])
        taken = torch.randperm(width, generator=generator)[: round(channels * width)].to(features.device)
        mixed[row, taken] = features[partner, taken]
    return mixed


class FeatureBank:
    """Unit-length teacher features of the latest ``size`` samples (a ring buffer); saved with a
    generator's state so a resumed set keeps its negatives."""

    def __init__(self, size: int):
        self.size = size
        self.features: torch.Tensor | None = None

    def add(self, features: torch.Tensor) -> None:
        unit = F.normalize(features.detach().float(), dim=1).cpu()
        joined = unit if self.features is None else torch.cat([self.features, unit])
        self.features = joined[-self.size:].contiguous()


class BoundaryTerms:
    """The boundary techniques' part of the inversion objective for one teacher (and student):
    soft targets for a batch (:meth:`aim`), the extra loss of a step (:meth:`loss`), and the
    memory bank fed after each batch (:meth:`end_batch`). Use :meth:`hooked` around a batch's
    steps to record the teacher's penultimate features."""

    def __init__(self, settings: BoundarySettings, teacher: Classifier, student: Classifier | None):
        self.settings = settings
        self.teacher = teacher
        self.student = student
        for name in NEEDS_STUDENT:
            if settings.on(name) and student is None:
                raise SynthkdError(f"the {name} technique needs a student: pass --student MODEL_DIR to generate, use "
                                   f"distill --synthesize fast, or drop {name} from --techniques")
        self.partners = confusable_partners(teacher) if settings.on("interpolate") else None
        self.bank = FeatureBank(settings.bank_size) if settings.on("contrastive") else None
        self.features: torch.Tensor | None = None  # the teacher's penultimate features of the last step

    @property
    def needs_student_logits(self) -> bool:
        return self.settings.on("adversarial") and self.settings.adversarial_weight > 0

    def aim(self, targets: torch.Tensor, seed: int) -> torch.Tensor:
        """The targets a batch is optimised towards: ``targets`` itself, or soft targets where
        ``interpolate`` aims part of the batch between two classes."""
        if self.partners is None or len(targets) == 0:
            return targets
        cfg = self.settings
        return interpolation_targets(targets, self.partners, self.teacher.num_classes, cfg.interpolate_fraction,
                                     cfg.interpolate_weight, seed)

    @contextmanager
    def hooked(self) -> Iterator[None]:
        """Record the input of the teacher's last linear layer while the batch's steps run."""
        if self.bank is None:
            yield
            return
        linear = dict(self.teacher.net.named_modules())[default_layer(self.teacher)]

        def record(module: nn.Module, inputs: tuple[torch.Tensor]) -> None:
            self.features = inputs[0].flatten(1)

        handle = linear.register_forward_pre_hook(record)
        try:
            yield
        finally:
            handle.remove()

    def loss(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor | None) -> torch.Tensor:
        """The techniques' terms for the views of one step (zero when none is on)."""
        cfg = self.settings
        total = teacher_logits.new_zeros(())
        if self.needs_student_logits:
            total = total + cfg.adversarial_weight * agreement_masked_adversarial(teacher_logits, student_logits)
        if self.bank is not None and cfg.contrastive_weight > 0:
            total = total + cfg.contrastive_weight * instance_discrimination(
                self.features, self.bank.features, cfg.contrastive_temperature)
        return total

    def end_batch(self) -> None:
        """Add the last step's features of the batch to the memory bank."""
        if self.bank is not None and self.features is not None and len(self.features):
            self.bank.add(self.features)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.bank is None or self.bank.features is None:
            return {}
        return {"feature_bank": self.bank.features}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.bank is not None and "feature_bank" in tensors:
            self.bank.features = tensors["feature_bank"].float()
