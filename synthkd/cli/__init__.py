"""The ``synthkd`` command line. Each command is a thin layer over a stage in ``pipelines``;
each module here registers the commands of one area on the group ``main``."""

from .base import main, make_accelerator
from . import data_free, detector, diffusion, export, run, search  # noqa: F401  (register their commands)

__all__ = ["main", "make_accelerator"]
