"""Real image datasets named by spec strings; every one yields typed (image in [0,1], label) items.

Specs: ``fashion-mnist:train``, ``fashion-mnist:/root:test``, ``digits:test``,
``cifar10:/path/to/cifar-10-batches-py:train``, ``folder:/path`` (one sub-folder per class, or a flat folder of unlabelled images),
``noise:gaussian[:N]`` / ``noise:uniform[:N]``. Any labelled spec may keep only some classes,
``fashion-mnist:train[classes=0-7]`` (ids and ranges; the kept classes are renumbered 0.. in that
order, so a classifier trains on them alone, and ``fashion-mnist:test[classes=8,9]`` gives the
held-out ones as near out-of-distribution inputs, OpenOOD style). Any spec may end in a slice, ``digits:train[:200]``,
and then in image transforms after ``|``, applied in order: ``fashion-mnist:test[:1000]|vflip|invert``
(``hflip``, ``vflip``, ``invert``, ``rot90``), which make shifted or out-of-distribution sets.

Each kind is one module in :mod:`synthkd.data.kinds` that registers its reader in
:data:`DATASETS` with :func:`register_dataset`; loading, checking and listing read the registry,
so a new kind touches nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import Dataset

from ..errors import SynthkdError
from ..registry import Registry
from .batches import LabelledBatch

SPLITS = ("train", "test")


class ImageDataset(Dataset):
    """Images kept as one uint8 tensor (N, C, H, W); items are float images in [0,1] and labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str], name: str):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape N x C x H x W")
        self.images = images
        self.labels = labels.long()
        self.class_names = class_names
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> LabelledBatch:
        return LabelledBatch(self.images[index].float().div_(255), int(self.labels[index]))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, index: slice) -> "ImageDataset":
        return ImageDataset(self.images[index], self.labels[index], self.class_names, self.name)

    def channel_stats(self, max_images: int = 10000) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of [0,1] pixels, for the model's normalisation."""
        images = self.images[:max_images].float().div_(255)
        return images.mean((0, 2, 3)).tolist(), images.std((0, 2, 3)).tolist()


IMAGE_TRANSFORMS = {
    "hflip": lambda image: image.flip(-1),
    "vflip": lambda image: image.flip(-2),
    "invert": lambda image: 1.0 - image,
    "rot90": lambda image: image.rot90(1, (-2, -1)),
}


class TransformedDataset(Dataset):
    """A dataset whose [0,1] images pass through named transforms (labels and other fields kept)."""

    def __init__(self, dataset: Dataset, transforms: list[str]):
        unknown = [t for t in transforms if t not in IMAGE_TRANSFORMS]
        if unknown:
            raise SynthkdError(f"unknown image transform {unknown[0]!r}; use one of {', '.join(IMAGE_TRANSFORMS)} after '|'")
        self.dataset = dataset
        self.transforms = list(transforms)
        self.class_names = list(getattr(dataset, "class_names", []))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        image = item.images
        for name in self.transforms:
            image = IMAGE_TRANSFORMS[name](image)
        return item._replace(images=image)


# ---------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class DatasetKind:
    """What a dataset kind registers: how to read a spec's arguments (the parts after
    ``KIND:``), how to check them without reading images, and how to tell users about it."""

    read: Callable[[list[str]], Dataset]
    check: Callable[[list[str]], object] | None
    usage: str
    description: str


def _import_builtin_kinds() -> None:
    """Every module of :mod:`synthkd.data.kinds` registers one kind when imported; they import
    this module, so they are imported by name on first use, after it has loaded."""
    kinds = importlib.import_module(f"{__package__}.kinds")
    for module in pkgutil.iter_modules(kinds.__path__):
        importlib.import_module(f"{kinds.__name__}.{module.name}")


DATASETS: Registry[DatasetKind] = Registry("dataset", loader=_import_builtin_kinds)


def register_dataset(name: str, *, usage: str, description: str,
                     check: Callable[[list[str]], object] | None = None) -> Callable:
    """Decorator registering ``read(args) -> Dataset`` as the dataset kind ``name``;
    ``check(args)`` raises :class:`SynthkdError` for a spec that cannot load (default: none)."""

    def decorate(read: Callable[[list[str]], Dataset]) -> Callable[[list[str]], Dataset]:
        DATASETS.add(name, DatasetKind(read, check, usage, description))
        return read

    return decorate


def dataset_kinds() -> dict[str, DatasetKind]:
    """The registered kinds by name, for listings and help texts."""
    return {name: DATASETS.get(name) for name in DATASETS.names()}


@dataclass
class _Spec:
    kind: str
    args: list[str]
    index: slice | None
    classes: list[tuple[int, int]] | None = None


def parse_classes(text: str) -> list[tuple[int, int]]:
    """``0-7`` or ``8,9`` or ``0-3,5``: (first, last) ranges of class ids in the order given; they
    are expanded by :func:`select_classes` once the class count bounds them."""
    ranges = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if not match or (match.group(2) is not None and int(match.group(2)) < int(match.group(1))):
            raise SynthkdError(f"classes={text!r} is not a list of class ids or ranges; write e.g. classes=0-7 or classes=8,9")
        ranges.append((int(match.group(1)), int(match.group(2) or match.group(1))))
    return ranges


SLICE = r"\[(-?\d*):(-?\d*)\]"


def _parse(spec: str) -> _Spec:
    given, index, classes = spec, None, None
    match = re.fullmatch(rf"(.*){SLICE}", spec)
    if match:
        spec = match.group(1)
        index = slice(int(match.group(2)) if match.group(2) else None, int(match.group(3)) if match.group(3) else None)
    match = re.fullmatch(r"(.*)\[classes=([^\]]*)\]", spec)
    if match:
        spec, classes = match.group(1), parse_classes(match.group(2))
        if re.fullmatch(rf".*{SLICE}", spec):
            raise SynthkdError(f"{given!r} slices before choosing classes; write the classes first, "
                               f"SPEC[classes=...][START:STOP] (the slice is of the chosen classes' images)")
    kind, _, rest = spec.partition(":")
    return _Spec(kind, rest.split(":") if rest else [], index, classes)


def select_classes(dataset: Dataset, ranges: list[tuple[int, int]], spec: str) -> ImageDataset:
    """The images of the classes in ``ranges`` only, their labels renumbered 0.. in the order given."""
    if not isinstance(dataset, ImageDataset):
        raise SynthkdError(f"[classes=...] needs a labelled dataset held in memory; {spec!r} is not one")
    unknown = [last for _, last in ranges if last >= dataset.num_classes]
    if unknown:
        raise SynthkdError(f"{spec!r} has classes 0-{dataset.num_classes - 1}, not {unknown[0]}")
    classes = list(dict.fromkeys(c for first, last in ranges for c in range(first, last + 1)))
    keep = torch.isin(dataset.labels, torch.tensor(classes))
    renumber = torch.full((dataset.num_classes,), -1, dtype=torch.long)
    renumber[torch.tensor(classes)] = torch.arange(len(classes))
    return ImageDataset(dataset.images[keep], renumber[dataset.labels[keep]], [dataset.class_names[c] for c in classes],
                        f"{dataset.name}[classes={','.join(map(str, classes))}]")


def _kind(parsed: _Spec, spec: str) -> DatasetKind:
    if parsed.kind not in DATASETS:
        usages = ", ".join(kind.usage for kind in dataset_kinds().values())
        raise SynthkdError(f"unknown dataset {parsed.kind!r} in {spec!r}; use one of {usages}")
    return DATASETS.get(parsed.kind)


def load_dataset(spec: str) -> Dataset:
    """Load a dataset by spec string (see the module docstring)."""
    spec, *transforms = spec.split("|")
    parsed = _parse(spec)
    dataset = _kind(parsed, spec).read(parsed.args)
    if parsed.classes is not None:
        dataset = select_classes(dataset, parsed.classes, spec)
    if parsed.index is not None:
        total = len(dataset)
        dataset = dataset.subset(parsed.index) if hasattr(dataset, "subset") else torch.utils.data.Subset(
            dataset, range(len(dataset))[parsed.index])
        if len(dataset) == 0:
            raise SynthkdError(f"{spec} is empty: the slice keeps none of the {total} images; "
                               "give [START:STOP] with START before STOP")
    return TransformedDataset(dataset, transforms) if transforms else dataset


def check_dataset(spec: str) -> None:
    """Raise :class:`SynthkdError` if ``spec`` names an unknown kind or files that are not there,
    without reading any images (config validation checks every spec before a run starts)."""
    parsed = _parse(spec.split("|")[0])
    kind = _kind(parsed, spec)
    if kind.check is not None:
        kind.check(parsed.args)


def split_args(args: list[str], kind: str, needs_path: bool) -> tuple[str | None, str]:
    """``[PATH..., SPLIT]`` -> (path or None, split) for kinds spelled ``KIND:[PATH:]SPLIT``
    (a path may itself hold colons)."""
    split = args[-1] if args and args[-1] in SPLITS else None
    paths = args[:-1] if split else args
    path = ":".join(paths) if paths else None
    if split is None:
        raise SynthkdError(f"{kind} needs a split: {kind}:{'PATH:' if needs_path else ''}train or :test")
    if needs_path and not path:
        raise SynthkdError(f"{kind} needs a path: {kind}:/path/to/data:{split}")
    return path, split


def dataset_spec_help() -> list[tuple[str, str]]:
    """The dataset spec grammar for ``-h``, as (form, meaning) rows: every registered kind's usage
    and description (a new kind shows up by registering), then the slice and transform suffixes."""
    rows = [(kind.usage, kind.description) for kind in dataset_kinds().values()]
    return rows + [("SPEC[START:STOP]", "a slice of any of them, e.g. digits:train[:200]"),
                   ("SPEC|TRANSFORM...", f"image transforms applied in order ({', '.join(IMAGE_TRANSFORMS)}), "
                                         "e.g. fashion-mnist:test[:1000]|vflip")]
