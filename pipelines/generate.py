"""Stage: make a synthetic set with any registered method, into the resumable shard format.

:func:`generate_set` is the stage (``synthkd generate``, ``synthkd run``, the demo): it builds the
method that ``GenerateSettings.method`` names from the registry and fills the set. Every rank makes
its share of the pending shards. A shard is filled by draws: the generator makes images for the
shard's missing slots, the teacher labels them (soft labels: its logits), and an optional
:class:`SelectionSettings` keeps only confident ones and/or each class's share, drawing again until
the shard is full or the tries run out (the shortfall is then filled with the best rejected images,
and the manifest's ``report`` says what was reached per class). Ranks of a ``collective`` generator
advance in lockstep (a rank with nothing to draw passes an empty batch) because it may all-reduce
at every step; the others go at their own pace.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields, make_dataclass
from typing import Any

import torch
from accelerate import Accelerator

from synthkd.accelerator import log_progress, make_accelerator, progress_bar
from synthkd.data.writer import SyntheticWriter
from synthkd.errors import SynthkdError
from synthkd.generators.activations import ActivationSettings
from synthkd.generators.base import SyntheticImageGenerator, teacher_record
from synthkd.generators.boundary import BoundarySettings, method_problems
from synthkd.generators.diagnostic import diagnose_set
from synthkd.generators.diffusion import DiffusionSettings
from synthkd.generators.fast import FastSettings
from synthkd.generators.inversion import InversionSettings
from synthkd.generators.registry import DEFAULT_METHOD, GENERATORS, method_help, method_names
from synthkd.models import Classifier
from synthkd.seeds import derive_seed
from synthkd.settings import Settings, read_value, setting, show

from .activations import generate_activations


def _probability(value: float) -> str | None:
    return None if 0 <= value <= 1 else f"must be in [0, 1], got {show(value)}"


@dataclass
class SelectionSettings(Settings):
    """Which drawn images a shard keeps, judged by the teacher (any method; useful with diffusion)."""

    min_confidence: float = setting(0.0, check=_probability,
                                    help="Keep only images the teacher labels with at least this probability.")
    balance: bool = setting(False, help="Keep drawing until each class (by the teacher's label) has its share of "
                                        "every shard.")
    max_tries: int = setting(10, at_least=1, help="Draws per shard for --min-confidence/--balance; then the best "
                                                  "rejected images fill the gap.")

    @property
    def active(self) -> bool:
        return self.min_confidence > 0 or self.balance


@dataclass
class GenerateSettings(InversionSettings):
    """The synthetic set (``synthkd generate``; ``generate:`` of a run): ``num_images`` in shards of
    ``batch_size``, made by ``method``. The inversion settings (iterations, lr, the loss weights) sit
    at the top, where the methods that invert the teacher read them; ``fast``, ``diffusion`` and
    ``activations`` hold those methods' own settings; any other registered method's settings are
    ``generate.<method>`` (``--method-option KEY=VALUE`` on the command line)."""

    method: str = setting(DEFAULT_METHOD, choices=method_names, help=f"How the inputs are made. {method_help()}.")
    num_images: int = setting(6144, positive=True,
                              help="Images to make (inputs per neighbourhood with --method activations).")
    batch_size: int = setting(256, positive=True, help="Images per batch (and per shard).")
    fast: FastSettings = setting(default_factory=FastSettings, help="--method fast")
    diffusion: DiffusionSettings = setting(default_factory=DiffusionSettings, help="--method diffusion")
    activations: ActivationSettings = setting(default_factory=ActivationSettings, help="--method activations")
    selection: SelectionSettings = setting(default_factory=SelectionSettings, help="the teacher's selection")
    boundary: BoundarySettings = setting(default_factory=BoundarySettings,
                                         help="techniques that aim samples at the decision boundaries")
    diagnose: bool = setting(True, help="Write the set's per-class diagnostic (diagnostic.json beside the manifest; "
                                        "see `synthkd inspect`).")

    @classmethod
    def from_mapping(cls, raw: Any, prefix: str = "", errors: list[str] | None = None) -> Any:
        """As :meth:`Settings.from_mapping`, with a ``<method>:`` section for every registered method
        that brings its own settings."""
        full = with_method_sections(cls)
        return super(GenerateSettings, full).from_mapping(raw, prefix, errors)

    def section(self) -> Settings | None:
        """The chosen method's own settings (None for a method without)."""
        entry = GENERATORS.get(self.method)
        if entry.settings is None:
            return None
        return getattr(self, self.method, None) or entry.settings()

    def with_method_options(self, options: list[str] | tuple[str, ...]) -> "GenerateSettings":
        """These settings with ``KEY=VALUE`` pairs (values read as YAML) set in the method's section."""
        entry = GENERATORS.get(self.method)
        if not options:
            return self
        if entry.settings is None:
            raise SynthkdError(f"--method-option: the method {self.method} takes no options")
        raw, errors = asdict(self.section()), []
        for item in options:
            key, sep, text = item.partition("=")
            if sep:
                raw[key] = read_value(text)
            else:
                errors.append(f"{item}: expected KEY=VALUE")
        section = entry.settings.from_mapping(raw, "", errors)
        if errors:
            raise SynthkdError("--method-option " + "; ".join(errors))
        values = {spec.name: getattr(self, spec.name) for spec in fields(self)}
        return with_method_sections(type(self))(**{**values, self.method: section})

    def cross_problems(self) -> list[tuple[str, str]]:
        """The fields the chosen method needs set (the diffusion method's pipeline)."""
        if self.method not in GENERATORS:
            return []  # the method field names the problem
        section = self.section()
        entry = GENERATORS.get(self.method)
        problems = [(f"{self.method}.{name}", why) for name, why in entry.required.items() if getattr(section, name) is None]
        return problems + [("boundary.techniques", why) for why in method_problems(self.boundary, self.method, entry.techniques)]

    def relevant(self) -> dict[str, Any]:
        """What a set depends on: the method's own settings only, another method's are ignored
        (in the shape run records have had all along, so finished runs are not rerun)."""
        entry = GENERATORS.get(self.method)
        values = {"method": self.method, "num_images": self.num_images, "batch_size": self.batch_size,
                  **{name: getattr(self, name) for name in entry.reads}}
        section = self.section()
        if section is not None:
            values[self.method] = asdict(section)
        if self.selection != SelectionSettings():  # recorded only when used: runs from before it keep their print
            values["selection"] = asdict(self.selection)
        if self.boundary.active:  # likewise
            values["boundary"] = self.boundary.record()
        return values


_WITH_SECTIONS: dict[tuple[type, tuple[tuple[str, type], ...]], type] = {}


def with_method_sections(cls: type[GenerateSettings]) -> type[GenerateSettings]:
    """``cls`` with a field ``<method>`` for every registered method whose settings class is not
    already a field (built as a subclass when the registry changes)."""
    own = {spec.name for spec in fields(cls)}
    extra = tuple((name, GENERATORS.get(name).settings) for name in GENERATORS.names()
                  if GENERATORS.get(name).settings and name not in own)
    if not extra:
        return cls
    if (cls, extra) not in _WITH_SECTIONS:
        sections = [(name, kind, setting(default_factory=kind, help=f"--method {name}", cli=False)) for name, kind in extra]
        _WITH_SECTIONS[cls, extra] = make_dataclass(cls.__name__, sections, bases=(cls,))
    return _WITH_SECTIONS[cls, extra]


def generate_set(settings: GenerateSettings, teacher: Classifier, out: str | os.PathLike, seed: int = 0,
                 accelerator: Accelerator | None = None, competitor: Classifier | None = None) -> dict[str, Any]:
    """The generate stage (``synthkd generate``, ``synthkd run``): the set ``settings`` describe,
    made into ``out`` (resumed if it is there); returns its manifest. ``competitor``: a student the
    inputs should make disagree with the teacher (the competition term), if any."""
    settings.check()
    accelerator = accelerator or make_accelerator()
    teacher.to(accelerator.device)
    entry = GENERATORS.get(settings.method)
    made = entry.build(settings, teacher, competitor, seed)
    if entry.output == "activations":
        return generate_activations(teacher, made, settings.num_images, out, settings.batch_size, seed, accelerator)
    manifest = generate(teacher, made, settings.num_images, out, settings.batch_size, seed, accelerator, settings.selection)
    if settings.diagnose and accelerator.is_main_process:
        manifest = {**manifest, "diagnostic": diagnose_set(out, teacher, competitor)}
    accelerator.wait_for_everyone()
    return manifest


def draw_seed(seed: int, shard_id: int, attempt: int) -> int:
    """Every draw of every shard gets its own seed, the same on a resumed run."""
    return derive_seed(seed, "shard", shard_id, "draw", attempt)


@torch.no_grad()
def label_with_teacher(teacher: Classifier, images: torch.Tensor) -> torch.Tensor:
    return teacher.eval()(images).float()


class ShardDraws:
    """The slots of one shard and the images kept for them so far."""

    def __init__(self, plan: torch.Tensor, num_classes: int, selection: SelectionSettings, aims_at_targets: bool):
        self.plan = plan
        self.selection = selection
        self.aims = aims_at_targets
        self.quota = torch.bincount(plan, minlength=num_classes)
        self.kept: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # image, logits, target
        self.pool_images: torch.Tensor | None = None  # rejected images, the best kept for the shortfall
        self.pool_logits = torch.zeros(0, num_classes)
        self.drawn = torch.zeros(num_classes, dtype=torch.long)  # by the teacher's label
        self.tries = 0

    def missing(self) -> torch.Tensor:
        """The targets of the slots still empty."""
        if self.selection.balance:
            return torch.repeat_interleave(torch.arange(len(self.quota)), self.quota)
        return self.plan[len(self.kept):]

    def request(self) -> torch.Tensor:
        """What to draw next: the missing targets, over-drawn by the acceptance rate so far."""
        missing = self.missing()
        if len(missing) == 0:
            return missing
        rate = len(self.kept) / int(self.drawn.sum()) if self.tries else 1.0
        size = min(len(self.plan), math.ceil(len(missing) / max(rate, 1.0 / len(self.plan))))
        return missing.repeat(math.ceil(size / len(missing)))[:size]

    def offer(self, images: torch.Tensor, logits: torch.Tensor, aimed: torch.Tensor) -> None:
        """Keep what the selection accepts; the rest join the pool of rejected images."""
        self.tries += 1
        confidence, label = logits.softmax(1).max(1)
        self.drawn += torch.bincount(label, minlength=len(self.drawn))
        rejected = []
        for i in range(len(images)):
            if len(self.kept) == len(self.plan) or confidence[i] < self.selection.min_confidence:
                rejected.append(i)
                continue
            if self.selection.balance:
                target = int(label[i])
                if self.quota[target] == 0:
                    rejected.append(i)
                    continue
                self.quota[target] -= 1
            else:
                target = int(aimed[i]) if self.aims else int(label[i])
            self.kept.append((images[i], logits[i], target))
        self._pool(images[rejected], logits[rejected])

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Images, logits and targets of the full shard, and what the selection reached."""
        accepted = torch.bincount(torch.tensor([t for *_, t in self.kept], dtype=torch.long), minlength=len(self.quota))
        filled = torch.zeros_like(accepted)
        for target in self.missing().tolist():  # tries ran out: the best rejected image per slot
            probabilities = self.pool_logits.softmax(1)
            if self.selection.balance:
                best = int(probabilities[:, target].argmax())
            else:
                best = int(probabilities.max(1).values.argmax())
                target = target if self.aims else int(probabilities[best].argmax())
            self.kept.append((self.pool_images[best], self.pool_logits[best], target))
            keep = torch.arange(len(self.pool_images)) != best
            self.pool_images, self.pool_logits = self.pool_images[keep], self.pool_logits[keep]
            filled[target] += 1
        targets = torch.tensor([target for *_, target in self.kept], dtype=torch.long)
        images = torch.stack([image for image, _, _ in self.kept]) if self.kept else torch.zeros(0)
        logits = torch.stack([logit for _, logit, _ in self.kept]) if self.kept else self.pool_logits[:0]
        report = {"accepted": accepted.tolist(), "filled": filled.tolist(), "drawn": self.drawn.tolist(), "tries": self.tries}
        if self.selection.balance or self.aims:  # the plan's share per class means something
            report["wanted"] = torch.bincount(self.plan, minlength=len(self.quota)).tolist()
        return images, logits, targets, report

    def _pool(self, images: torch.Tensor, logits: torch.Tensor) -> None:
        """Keep at most as many rejected images as there are empty slots, the most useful ones."""
        if len(images) == 0:
            return
        self.pool_images = images if self.pool_images is None else torch.cat([self.pool_images, images])
        self.pool_logits = torch.cat([self.pool_logits, logits])
        missing = self.missing()
        if len(self.pool_images) <= len(missing):
            return
        probabilities = self.pool_logits.softmax(1)
        usefulness = (probabilities[:, missing.unique()].max(1).values if self.selection.balance
                      else probabilities.max(1).values)
        best = usefulness.topk(len(missing)).indices
        self.pool_images, self.pool_logits = self.pool_images[best], self.pool_logits[best]


def shard_figures(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """What a tracker plots per shard: its size, the teacher's mean confidence, and how often the
    teacher's class is the one the image was made for."""
    logits = logits.float()
    return {"images": len(targets), "confidence": logits.softmax(1).amax(1).mean().item() if len(targets) else 0.0,
            "agreement": (logits.argmax(1) == targets).float().mean().item() if len(targets) else 0.0}


def fill_shard(
    teacher: Classifier,
    generator: SyntheticImageGenerator,
    plan: torch.Tensor,
    seed: int,
    shard: int,
    selection: SelectionSettings,
    accelerator: Accelerator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Draw until every slot of ``plan`` is filled by an accepted image, or the tries run out."""
    draws = ShardDraws(plan, teacher.num_classes, selection, generator.aims_at_targets)
    tries = selection.max_tries if selection.active else 1
    for attempt in range(tries):
        request = draws.request()
        pending = torch.tensor([len(request)], device=accelerator.device)
        if generator.collective:
            pending = accelerator.gather(pending).max()
        if int(pending) == 0:
            break
        images = generator.generate(request, seed=draw_seed(seed, shard, attempt))
        if len(request):
            images = images.cpu()
            draws.offer(images, label_with_teacher(teacher, images.to(accelerator.device)).cpu(), request)
    return draws.result()


def generate(
    teacher: Classifier,
    generator: SyntheticImageGenerator,
    num_images: int,
    out: str | os.PathLike,
    batch_size: int = 256,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    selection: SelectionSettings | None = None,
    max_rounds: int | None = None,
) -> dict[str, Any] | None:
    """Generate ``num_images`` into ``out``; returns the manifest. Resumes an interrupted run.
    With ``max_rounds`` stop after that many shard rounds (one shard per rank each) and return
    None if shards are left: an interleaved run makes its set a few shards at a time."""
    accelerator = accelerator or make_accelerator()
    selection = selection or SelectionSettings()
    teacher.to(accelerator.device)
    config = {**generator.config(), "seed": seed}
    if selection.active:  # recorded only when used, so sets made before selection existed still resume
        config["selection"] = asdict(selection)
    writer = SyntheticWriter(
        out,
        method=generator.method,
        config=config,
        teacher=teacher_record(teacher),
        num_images=num_images,
        num_classes=teacher.num_classes,
        image_shape=teacher.input_format.shape,
        shard_size=batch_size,
        accelerator=accelerator,
    )
    generator.load_state(writer.out_dir)
    pending = writer.pending_shards()
    rounds = len(pending)
    if generator.collective or max_rounds is not None:  # every rank must agree on the rounds
        rounds = int(accelerator.gather(torch.tensor([len(pending)], device=accelerator.device)).max())
    unfinished = max_rounds is not None and max_rounds < rounds
    rounds = min(rounds, max_rounds) if unfinished else rounds
    empty = torch.zeros(0, dtype=torch.long)
    bar = progress_bar(accelerator, total=rounds, desc=f"generate ({generator.method})")
    for round_index in range(rounds):
        started = time.perf_counter()
        shard = pending[round_index] if round_index < len(pending) else None
        plan = writer.shard_targets(shard) if shard is not None else empty
        images, logits, targets, report = fill_shard(
            teacher, generator, plan, seed, shard if shard is not None else 0, selection, accelerator)
        if shard is not None:
            writer.write_shard(shard, images, logits, targets, report if selection.active else None)
            log_progress(accelerator, f"generate/{generator.method}",
                         {"round": round_index + 1, **shard_figures(logits, targets), "seconds": time.perf_counter() - started},
                         step_key="round", level=logging.DEBUG)
        if accelerator.is_main_process:
            generator.save_state(writer.out_dir)
        bar.update(1)
    bar.close()
    if unfinished:
        accelerator.wait_for_everyone()
        return None
    return writer.finalize()
