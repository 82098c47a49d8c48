"""Real image datasets named by spec strings; every one yields (image in [0,1], label).

Specs: ``fashion-mnist:train``, ``fashion-mnist:/root:test``, ``digits:test``,
``cifar10:/path/to/cifar-10-batches-py:train``, ``folder:/path`` (one sub-folder per class, or a flat folder of unlabelled images),
``noise:gaussian[:N]`` / ``noise:uniform[:N]``. Any spec may end in a slice, ``digits:train[:200]``,
and then in image transforms after ``|``, applied in order: ``fashion-mnist:test[:1000]|vflip|invert``
(``hflip``, ``vflip``, ``invert``, ``rot90``), which make shifted or out-of-distribution sets.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import SynthkdError

FASHION_MNIST_ENV = "SYNTHKD_FASHION_MNIST"
FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255), int(self.labels[index])

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
        image, *rest = self.dataset[index]
        for name in self.transforms:
            image = IMAGE_TRANSFORMS[name](image)
        return (image, *rest)


class NoiseDataset(Dataset):
    """Gaussian or uniform noise images: the simplest out-of-distribution set."""

    def __init__(self, kind: str, size: int = 1000, image_shape: tuple[int, int, int] = (1, 28, 28), seed: int = 0):
        if kind not in ("gaussian", "uniform"):
            raise SynthkdError(f"unknown noise kind {kind!r}; use noise:gaussian or noise:uniform")
        generator = torch.Generator().manual_seed(seed)
        if kind == "gaussian":
            images = (0.5 + 0.25 * torch.randn(size, *image_shape, generator=generator)).clamp(0, 1)
        else:
            images = torch.rand(size, *image_shape, generator=generator)
        self.images = images
        self.class_names: list[str] = []
        self.name = f"noise:{kind}"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], -1


@dataclass
class _Spec:
    kind: str
    args: list[str]
    index: slice | None


def _parse(spec: str) -> _Spec:
    index = None
    match = re.fullmatch(r"(.*)\[(-?\d*):(-?\d*)\]", spec)
    if match:
        spec = match.group(1)
        index = slice(int(match.group(2)) if match.group(2) else None, int(match.group(3)) if match.group(3) else None)
    kind, _, rest = spec.partition(":")
    return _Spec(kind, rest.split(":") if rest else [], index)


def load_dataset(spec: str) -> Dataset:
    """Load a dataset by spec string (see the module docstring)."""
    spec, *transforms = spec.split("|")
    parsed = _parse(spec)
    loaders = {
        "fashion-mnist": _fashion_mnist,
        "digits": _digits,
        "cifar10": _cifar10,
        "folder": _folder,
        "noise": _noise,
    }
    if parsed.kind not in loaders:
        raise SynthkdError(
            f"unknown dataset {parsed.kind!r} in {spec!r}; use one of fashion-mnist:SPLIT, digits:SPLIT, "
            "cifar10:PATH:SPLIT, folder:PATH, noise:gaussian|uniform"
        )
    dataset = loaders[parsed.kind](parsed.args)
    if parsed.index is not None:
        dataset = dataset.subset(parsed.index) if isinstance(dataset, ImageDataset) else torch.utils.data.Subset(
            dataset, range(len(dataset))[parsed.index])
    return TransformedDataset(dataset, transforms) if transforms else dataset


def _split_args(args: list[str], kind: str, needs_path: bool) -> tuple[str | None, str]:
    split = args[-1] if args and args[-1] in SPLITS else None
    paths = args[:-1] if split else args
    path = ":".join(paths) if paths else None
    if split is None:
        raise SynthkdError(f"{kind} needs a split: {kind}:{'PATH:' if needs_path else ''}train or :test")
    if needs_path and not path:
        raise SynthkdError(f"{kind} needs a path: {kind}:/path/to/data:{split}")
    return path, split


def check_dataset(spec: str) -> None:
    """Raise :class:`SynthkdError` if ``spec`` names an unknown kind or files that are not there,
    without reading any images (config validation checks every spec before a run starts)."""
    parsed = _parse(spec)
    if parsed.kind == "fashion-mnist":
        _fashion_mnist_files(parsed.args)
    elif parsed.kind == "cifar10":
        _cifar10_files(parsed.args)
    elif parsed.kind == "folder":
        _folder_root(parsed.args)
    elif parsed.kind == "digits":
        _split_args(parsed.args, "digits", needs_path=False)
    elif parsed.kind != "noise":
        load_dataset(spec)  # names the unknown kind and the known ones


def _fashion_mnist_files(args: list[str]) -> tuple[list[Path], str]:
    path, split = _split_args(args, "fashion-mnist", needs_path=False)
    root = Path(path or os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DEFAULT))
    prefix = "train" if split == "train" else "t10k"
    files = [root / f"{prefix}-{kind}-idx{dim}-ubyte" for kind, dim in (("images", 3), ("labels", 1))]
    resolved = []
    for file in files:
        candidates = [file, file.with_name(file.name + ".gz")]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise SynthkdError(
                f"Fashion-MNIST not found: no {file.name}[.gz] in {root}. Install it with "
                f"`apt-get install dataset-fashion-mnist`, or point {FASHION_MNIST_ENV} or the spec "
                "(fashion-mnist:/path:train) at a folder with the IDX files"
            )
        resolved.append(found)
    return resolved, split


def _fashion_mnist(args: list[str]) -> ImageDataset:
    resolved, split = _fashion_mnist_files(args)
    images = _read_idx(resolved[0])
    labels = _read_idx(resolved[1])
    return ImageDataset(
        torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
        list(FASHION_MNIST_CLASSES), f"fashion-mnist:{split}",
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SynthkdError(f"{path} is not an IDX file of unsigned bytes (bad magic number); re-install the dataset")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise SynthkdError(f"{path} is truncated: header says {shape}, found {payload.size} bytes")
    return payload.reshape(shape).copy()


def _digits(args: list[str]) -> ImageDataset:
    from sklearn.datasets import load_digits

    _, split = _split_args(args, "digits", needs_path=False)
    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    # A fixed, class-stratified split: every 4th image of each class is test.
    order = torch.argsort(labels, stable=True)
    rank_in_class = torch.empty_like(labels)
    for label in labels.unique():
        members = order[labels[order] == label]
        rank_in_class[members] = torch.arange(len(members))
    chosen = (rank_in_class % 4 == 3) if split == "test" else (rank_in_class % 4 != 3)
    return ImageDataset(images[chosen], labels[chosen], [str(i) for i in range(10)], f"digits:{split}")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, strings, bytes and numpy arrays: CIFAR batches need no more."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
        # pickle protocol 5 (the default from Python 3.14) stores arrays through _frombuffer
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise SynthkdError(f"{path} is not a CIFAR-10 python batch: {error}") from error


def _cifar10_files(args: list[str]) -> tuple[list[Path], str]:
    path, split = _split_args(args, "cifar10", needs_path=True)
    root = Path(path)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise SynthkdError(
            f"CIFAR-10 python batches not found in {root} (missing {', '.join(missing)}); point the spec at "
            "the extracted cifar-10-batches-py folder"
        )
    return [root / name for name in names], split


def _cifar10(args: list[str]) -> ImageDataset:
    files, split = _cifar10_files(args)
    images, labels = [], []
    for file in files:
        batch = _load_cifar_batch(file)
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[b"labels"])
    return ImageDataset(
        torch.from_numpy(np.concatenate(images)), torch.tensor(labels), list(CIFAR10_CLASSES), f"cifar10:{split}"
    )


def _folder_root(args: list[str]) -> Path:
    root = Path(":".join(args))
    if not root.is_dir():
        raise SynthkdError(f"image folder {root} does not exist (expected folder:/path with one sub-folder per class)")
    return root


def _folder(args: list[str]) -> ImageDataset:
    from PIL import Image

    root = _folder_root(args)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    entries = [(f, label) for label, c in enumerate(classes) for f in sorted((root / c).iterdir())
               if f.suffix.lower() in IMAGE_SUFFIXES]
    if not entries:  # a flat folder of unlabelled images (label -1), e.g. inputs to check with `synthkd detect`
        classes = []
        entries = [(f, -1) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not entries:
        raise SynthkdError(f"no images found under {root}; expected {root}/CLASS_NAME/image.png or {root}/image.png")
    # Open one file at a time: holding every image open runs out of file descriptors.
    modes, size = [], None
    for f, _ in entries:
        with Image.open(f) as im:
            modes.append(im.mode)
            size = size or im.size  # every image is resized to the first one's size
    mode = "L" if all(m in ("L", "1", "I;16") for m in modes) else "RGB"
    arrays = []
    for f, _ in entries:
        with Image.open(f) as im:
            arrays.append(np.asarray(im.convert(mode).resize(size, Image.BILINEAR)))
    images = torch.from_numpy(np.stack(arrays))
    images = images.unsqueeze(1) if mode == "L" else images.permute(0, 3, 1, 2)
    return ImageDataset(images.contiguous(), torch.tensor([l for _, l in entries]), classes, f"folder:{root}")


def _noise(args: list[str]) -> NoiseDataset:
    if len(args) > 1 and not args[1].isdigit():
        raise SynthkdError(f"noise takes a kind and an optional size: noise:gaussian:5000, got noise:{':'.join(args)}")
    return NoiseDataset(args[0] if args else "gaussian", int(args[1]) if len(args) > 1 else 1000)
