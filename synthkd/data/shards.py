"""The synthetic-set API under its historical import path: the format, writer and reader live
in :mod:`synthkd.data.format`, :mod:`synthkd.data.writer` and :mod:`synthkd.data.reader`."""

from .format import MANIFEST_NAME, RUN_NAME, shard_name
from .reader import SyntheticDataset, is_synthetic_dir, load_written_shards
from .writer import SyntheticWriter

__all__ = ["MANIFEST_NAME", "RUN_NAME", "SyntheticDataset", "SyntheticWriter", "is_synthetic_dir",
           "load_written_shards", "shard_name"]
