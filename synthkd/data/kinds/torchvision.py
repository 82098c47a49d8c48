"""``torchvision:NAME:ROOT:SPLIT``: a torchvision dataset by class name, from files already under
ROOT (never downloaded), e.g. ``torchvision:FashionMNIST:/data:train``, ``torchvision:SVHN:/data:test``.

SPLIT becomes ``train=`` (train/test) or ``split=``, whichever the class takes. torchvision reads
CIFAR with ``pickle.load``, which runs code a crafted file carries, so CIFAR is refused here in
favour of ``cifar10:`` and its allow-listed unpickler. torchvision wants its own layout
(``ROOT/FashionMNIST/raw/`` with unpacked IDX files); the gzip'd Debian files are read by
``fashion-mnist:``.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from ...errors import SynthkdError
from ..datasets import register_dataset
from ..pil import PILDataset

PICKLED = {"CIFAR10": "cifar10:ROOT/cifar-10-batches-py:SPLIT", "CIFAR100": "a folder: of images"}


def torchvision_dataset_class(args: list[str]) -> tuple[Any, Path, str]:
    """(dataset class, root, split) of ``NAME:ROOT:SPLIT``, or an error saying what is wrong."""
    if len(args) < 3:
        raise SynthkdError("torchvision datasets are named torchvision:NAME:ROOT:SPLIT, e.g. torchvision:FashionMNIST:/data:train")
    name, root, split = args[0], Path(":".join(args[1:-1])), args[-1]
    if name in PICKLED:
        raise SynthkdError(f"torchvision reads {name} with pickle.load, which runs any code a crafted file carries; "
                           f"use {PICKLED[name]} instead")
    try:
        datasets = importlib.import_module("torchvision.datasets")
    except (ImportError, RuntimeError) as error:
        raise SynthkdError(f"torchvision: datasets need torchvision ({error}); pip install 'synthkd[vision]'") from error
    found = getattr(datasets, name, None)
    if not inspect.isclass(found) or name not in datasets.__all__:
        raise SynthkdError(f"torchvision has no dataset {name!r}; see torchvision.datasets.__all__")
    if not root.is_dir():
        raise SynthkdError(f"{root} is no directory; torchvision:{name} reads its files from ROOT (nothing is downloaded)")
    return found, root, split


@register_dataset("torchvision", usage="torchvision:NAME:ROOT:SPLIT", check=torchvision_dataset_class,
                  description="a torchvision dataset from files under ROOT, e.g. torchvision:FashionMNIST:/data:train")
def torchvision_dataset(args: list[str]) -> PILDataset:
    cls, root, split = torchvision_dataset_class(args)
    parameters = inspect.signature(cls).parameters
    if "train" in parameters:
        if split not in ("train", "test"):
            raise SynthkdError(f"torchvision:{cls.__name__} has the splits train and test, not {split!r}")
        where = {"train": split == "train"}
    elif "split" in parameters:
        where = {"split": split}
    else:
        where = {}
    kwargs = {"download": False} if "download" in parameters else {}
    try:
        dataset = cls(str(root), **where, **kwargs)
    except (RuntimeError, ValueError, OSError) as error:
        raise SynthkdError(f"torchvision:{cls.__name__} cannot read {root} ({' '.join(str(error).split())}); it expects "
                           f"its own layout under ROOT, as its download=True would leave it") from error
    classes = [str(c) for c in getattr(dataset, "classes", [])]
    return PILDataset(dataset.__getitem__, len(dataset), classes, f"torchvision:{cls.__name__}:{split}")
