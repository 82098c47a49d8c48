"""What a candidate costs, and the user's budget.

Three kinds: ``params`` (parameters, without the entries pruning set to zero, which a sparse
format need not store), ``flops`` (counted by ``torch.utils.flop_counter`` for one input at the
activation shape the piece sees; dense kernels, so pruning does not lower it) and ``latency``
(the median of timed runs for one input on the current device; dense kernels as well).
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..accelerator import synchronize
from ..errors import SynthkdError
from ..models.born import count_flops

KINDS = ("params", "flops", "latency")
LATENCY_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def count_parameters(module: nn.Module) -> int:
    """Parameters, less the exact zeros of convolution and linear weights (pruned entries)."""
    total = sum(p.numel() for p in module.parameters())
    pruned = sum(int((m.weight == 0).sum()) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return total - pruned


@torch.no_grad()
def measure_latency(module: nn.Module, x: torch.Tensor, device: torch.device, repeats: int = 15, warmup: int = 3) -> float:
    """Median seconds of one forward pass of ``module`` on ``x`` on ``device``."""
    home = next(module.parameters(), x).device  # put back where it was: the teacher's pieces are shared
    module = module.to(device).eval()
    x = x.to(device)
    times = []
    for run in range(warmup + repeats):
        synchronize(device)
        started = time.perf_counter()
        module(x)
        synchronize(device)
        if run >= warmup:
            times.append(time.perf_counter() - started)
    module.to(home)
    return statistics.median(times)


def weight_free_cost(kind: str, module: nn.Module, x: torch.Tensor) -> float:
    """Parameters or FLOPs of ``module`` for one input ``x``: neither depends on the weights' values
    (pruned entries aside), so they are known before any training."""
    return float(count_parameters(module) if kind == "params" else count_flops(module, x))


def measure(module: nn.Module, x: torch.Tensor, device: torch.device) -> dict[str, float]:
    """All three costs of ``module`` for one input ``x`` (batch of 1)."""
    module.eval()
    return {"params": weight_free_cost("params", module, x), "flops": weight_free_cost("flops", module, x),
            "latency": measure_latency(module, x, device)}


def describe(kind: str, value: float) -> str:
    if kind == "params":
        return f"{value:,.0f} parameters"
    if kind == "flops":
        return f"{value / 1e6:,.3f} MFLOPs"
    return f"{value * 1e3:.3f} ms"


@dataclass
class Budget:
    """A total cost: an absolute ``value``, or a ``fraction`` of the teacher's cost."""

    kind: str
    value: float | None = None
    fraction: float | None = None

    def limit(self, teacher_cost: float) -> float:
        return self.value if self.value is not None else self.fraction * teacher_cost

    def __str__(self) -> str:
        return f"{self.kind}={self.fraction:g} of the teacher" if self.fraction is not None else f"{self.kind}={describe(self.kind, self.value)}"


def parse_budget(text: str) -> Budget:
    """``params=0.3`` / ``0.3`` / ``flops=25%`` (fractions of the teacher's cost), ``params=50000``,
    ``flops=2e6``, ``latency=1.5ms`` (absolute; latency takes s, ms or us)."""
    kind, _, amount = text.strip().rpartition("=")
    kind = kind.strip() or "params"
    if kind not in KINDS:
        raise SynthkdError(f"unknown budget kind {kind!r} in {text!r}; use one of {', '.join(KINDS)} (e.g. params=0.3)")
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%|s|ms|us)?\s*", amount)
    if not match:
        raise SynthkdError(f"cannot read the budget {text!r}; write e.g. params=0.3, flops=2e6 or latency=1.5ms")
    number, unit = float(match.group(1)), match.group(2)
    if number <= 0:
        raise SynthkdError(f"the budget {text!r} must be positive")
    if unit == "%":
        return Budget(kind, fraction=number / 100)
    if unit is not None:
        if kind != "latency":
            raise SynthkdError(f"a {kind} budget takes no unit ({text!r}); units s, ms, us are for latency")
        return Budget(kind, value=number * LATENCY_UNITS[unit])
    if number <= 1:
        return Budget(kind, fraction=number)
    if kind == "latency":
        raise SynthkdError(f"give the latency budget {text!r} a unit (s, ms, us), or a fraction of the teacher's up to 1")
    return Budget(kind, value=number)
