"""Data: real datasets by spec string and the synthetic shard format."""

from .datasets import ImageDataset, NoiseDataset, check_dataset, load_dataset

__all__ = ["ImageDataset", "NoiseDataset", "check_dataset", "load_dataset"]
