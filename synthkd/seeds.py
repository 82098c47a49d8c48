"""One way to derive a seed from a run's seed and the named parts of what it seeds.

Seeds of shards, epochs, steps and ranks are all ``derive_seed(seed, "shard", shard_id)``-style
calls: numpy's SeedSequence mixes the parts, so two different tuples never collide by arithmetic
(as ``seed * 1_000_003 + shard`` could) and the result is the same on every platform.
"""

from __future__ import annotations

import hashlib

import numpy as np


def _entropy(part: int | str) -> int:
    if isinstance(part, bool) or not isinstance(part, (int, str)):
        raise TypeError(f"seed parts are integers or names, got {part!r}")
    if isinstance(part, str):
        return int.from_bytes(hashlib.sha256(part.encode()).digest()[:8], "little")
    return part if part >= 0 else (1 << 64) + part  # SeedSequence takes non-negative entropy only


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ``parts`` (integers and names); equal parts give equal seeds."""
    sequence = np.random.SeedSequence([_entropy(part) for part in parts])
    return int(sequence.generate_state(1, np.uint64)[0] >> 1)
