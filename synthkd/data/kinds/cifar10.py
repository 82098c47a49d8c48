"""``cifar10:PATH:SPLIT``: the python batches of CIFAR-10, unpickled with an allow-list."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from ...errors import SynthkdError
from ..datasets import ImageDataset, register_dataset, split_args

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]


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


def cifar10_files(args: list[str]) -> tuple[list[Path], str]:
    """The batch files of the split, or an error naming the missing ones."""
    path, split = split_args(args, "cifar10", needs_path=True)
    root = Path(path)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise SynthkdError(
            f"CIFAR-10 python batches not found in {root} (missing {', '.join(missing)}); point the spec at "
            "the extracted cifar-10-batches-py folder"
        )
    return [root / name for name in names], split


@register_dataset("cifar10", usage="cifar10:PATH:SPLIT", check=cifar10_files,
                  description="CIFAR-10 python batches in the extracted cifar-10-batches-py folder PATH")
def cifar10(args: list[str]) -> ImageDataset:
    files, split = cifar10_files(args)
    images, labels = [], []
    for file in files:
        batch = _load_cifar_batch(file)
        try:
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(label) for label in batch[b"labels"])
        except (KeyError, TypeError, ValueError) as error:
            raise SynthkdError(f"{file} is not a CIFAR-10 python batch (expected b'data' of N x 3072 bytes and "
                               f"b'labels': {error})") from error
        if len(labels) != sum(len(i) for i in images):
            raise SynthkdError(f"{file} is not a CIFAR-10 python batch: {len(images[-1])} images but other label counts")
    return ImageDataset(
        torch.from_numpy(np.concatenate(images)), torch.tensor(labels), list(CIFAR10_CLASSES), f"cifar10:{split}"
    )
