"""``fashion-mnist:[ROOT:]SPLIT``: the IDX files of Fashion-MNIST (gzip'd or not)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from ...errors import SynthkdError
from ..datasets import ImageDataset, register_dataset, split_args

FASHION_MNIST_ENV = "SYNTHKD_FASHION_MNIST"
FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def fashion_mnist_files(args: list[str]) -> tuple[list[Path], str]:
    """The images and labels files of the split, or an error saying how to install them."""
    path, split = split_args(args, "fashion-mnist", needs_path=False)
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


@register_dataset("fashion-mnist", usage="fashion-mnist:[ROOT:]SPLIT", check=fashion_mnist_files,
                  description=f"Fashion-MNIST IDX files (ROOT defaults to ${FASHION_MNIST_ENV} or {FASHION_MNIST_DEFAULT})")
def fashion_mnist(args: list[str]) -> ImageDataset:
    resolved, split = fashion_mnist_files(args)
    images = read_idx(resolved[0])
    labels = read_idx(resolved[1])
    return ImageDataset(
        torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
        list(FASHION_MNIST_CLASSES), f"fashion-mnist:{split}",
    )


def read_idx(path: Path) -> np.ndarray:
    """An IDX array of unsigned bytes (the (Fashion-)MNIST format), checked against its header."""
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
