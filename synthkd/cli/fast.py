"""Options of ``distill`` for making its data while it trains (``--synthesize fast``) and for
training on per-neighbourhood activations (``--mode neighbourhood --inputs activations``)."""

from __future__ import annotations

from typing import Callable

import click

from ..pipelines.interleave import InterleaveSettings
from .base import add_options, tagged
from .options import settings_options


def synthesis_options(function: Callable) -> Callable:
    """The ``--synthesize`` settings, passed as one :class:`InterleaveSettings` ``synthesis``, and ``--inputs``."""
    return add_options(function, [
        tagged(settings_options(InterleaveSettings, "synthesis"),
               help_group="--synthesize fast: make the set into --data while the student trains"),
        tagged(click.option("--inputs", type=click.Choice(["images", "activations"]), default="images", show_default=True,
                            help="Neighbourhood mode: train on images, or on a per-neighbourhood activation set "
                                 "from `generate --method activations` (no image at all)."),
               help_group="--mode neighbourhood"),
    ])
