"""``hf:imagefolder:DIR:SPLIT`` and ``hf:parquet:PATH:SPLIT``: a Hugging Face ``datasets`` set from
local files, read on access. The images are the first Image column; the labels the first
ClassLabel column (its names are the class names), else none (unlabelled, e.g. OOD inputs).
PATH of parquet may be a file, a glob or a directory of ``*.parquet``. Nothing is downloaded.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ...errors import SynthkdError
from ..datasets import register_dataset
from ..pil import PILDataset

BUILDERS = ("imagefolder", "parquet")


def hf_dataset_args(args: list[str]) -> tuple[str, str, str]:
    """(builder, path, split) of ``BUILDER:PATH:SPLIT``, checked without reading anything."""
    if len(args) < 3 or args[0] not in BUILDERS:
        raise SynthkdError("Hugging Face datasets are named hf:imagefolder:DIR:SPLIT or hf:parquet:PATH:SPLIT, "
                           "e.g. hf:imagefolder:/data/pets:train")
    builder, path, split = args[0], ":".join(args[1:-1]), args[-1]
    if builder == "imagefolder" and not Path(path).is_dir():
        raise SynthkdError(f"hf:imagefolder needs a directory; {path} is none")
    if builder == "parquet" and not (Path(path).exists() or list(Path(path).parent.glob(Path(path).name))):
        raise SynthkdError(f"hf:parquet: no file or directory matches {path}")
    return builder, path, split


def _data_files(path: str) -> str:
    return str(Path(path) / "*.parquet") if Path(path).is_dir() else path


@register_dataset("hf", usage="hf:imagefolder:DIR:SPLIT | hf:parquet:PATH:SPLIT", check=hf_dataset_args,
                  description="a Hugging Face datasets set from local image folders or parquet files")
def hf_dataset(args: list[str]) -> PILDataset:
    builder, path, split = hf_dataset_args(args)
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as error:
        raise SynthkdError(f"hf: datasets need the datasets package ({error}); pip install 'synthkd[datasets]'") from error
    datasets.disable_progress_bars()  # its progress lines and notices are not ours to show
    datasets.logging.set_verbosity_error()
    where: dict[str, Any] = {"data_dir": path} if builder == "imagefolder" else {"data_files": _data_files(path)}
    try:
        dataset = datasets.load_dataset(builder, split=split, **where)
    except (ValueError, FileNotFoundError, KeyError) as error:
        raise SynthkdError(f"hf:{builder}:{path}: cannot load split {split!r} ({' '.join(str(error).split())[:300]})") from error
    features = dataset.features
    image = next((name for name, kind in features.items() if isinstance(kind, datasets.Image)), None)
    if image is None:
        raise SynthkdError(f"hf:{builder}:{path} has no image column (its columns: {', '.join(features)})")
    label = next((name for name, kind in features.items() if isinstance(kind, datasets.ClassLabel)), None)
    names = list(features[label].names) if label else []

    return PILDataset(_Rows(dataset, image, label), len(dataset), names, f"hf:{builder}:{path}:{split}")


class _Rows:
    """(image, label or -1) of a row: a picklable reader, for loader workers that are spawned."""

    def __init__(self, dataset: Any, image: str, label: str | None):
        self.dataset, self.image, self.label = dataset, image, label

    def __call__(self, index: int) -> tuple[Any, int]:
        row = self.dataset[index]
        return row[self.image], row[self.label] if self.label else -1
