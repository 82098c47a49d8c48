"""Data: real datasets by spec string (a registry of kinds), typed batches, and the shard stores
of synthetic image sets and activation sets."""

from .batches import LabelledBatch, LabelledTensors, SyntheticBatch
from .datasets import DATASETS, ImageDataset, check_dataset, dataset_kinds, load_dataset, register_dataset

__all__ = [
    "DATASETS", "ImageDataset", "LabelledBatch", "LabelledTensors", "SyntheticBatch",
    "check_dataset", "dataset_kinds", "load_dataset", "register_dataset",
]
