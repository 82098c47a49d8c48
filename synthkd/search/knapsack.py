"""Exact multiple-choice knapsack over a chain of neighbourhoods, by Pareto frontiers.

One option is chosen per neighbourhood; a student's cost is the sum of its options' costs plus a
*link* cost between consecutive choices (the 1x1 adapter at the cut between them, whose size
depends on both), and its error is the sum of the options' errors. Costs may be large integers
(FLOPs) or floats (seconds), so rather than a dynamic programme over a cost grid this keeps, for
every choice at the current neighbourhood, all partial students no other partial student beats
in both cost and error. The link cost only looks one neighbourhood back, so this is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import SynthkdError


@dataclass(frozen=True)
class Solution:
    cost: float
    error: float
    choice: tuple[int, ...]  # option index per neighbourhood


LinkCost = Callable[[int, int, int], float]  # (cut index k, option at k, option at k+1) -> cost


def non_dominated(solutions: Sequence[Solution]) -> list[Solution]:
    """The solutions no other one beats in both cost and error, by increasing cost."""
    kept: list[Solution] = []
    for solution in sorted(solutions, key=lambda s: (s.cost, s.error)):
        if not kept or solution.error < kept[-1].error:
            kept.append(solution)
    return kept


def pareto_frontier(costs: Sequence[Sequence[float]], errors: Sequence[Sequence[float]],
                    link_cost: LinkCost | None = None) -> list[Solution]:
    """Every non-dominated (cost, summed error) student of the whole space, by increasing cost."""
    if not costs or any(len(c) == 0 or len(c) != len(e) for c, e in zip(costs, errors)) or len(costs) != len(errors):
        raise SynthkdError("every neighbourhood needs at least one candidate with a cost and an error")
    link = link_cost or (lambda k, a, b: 0.0)
    fronts = {b: [Solution(costs[0][b], errors[0][b], (b,))] for b in range(len(costs[0]))}
    for k in range(1, len(costs)):
        fronts = {
            b: non_dominated([Solution(s.cost + link(k - 1, a, b) + costs[k][b], s.error + errors[k][b], s.choice + (b,))
                              for a, front in fronts.items() for s in front])
            for b in range(len(costs[k]))
        }
    return non_dominated([s for front in fronts.values() for s in front])


def select(frontier: Sequence[Solution], budget: float, describe: Callable[[float], str] = str) -> Solution:
    """The least-error student whose cost is within ``budget``."""
    feasible = [s for s in frontier if s.cost <= budget]
    if not feasible:
        raise no_student_fits(describe(budget), f"the cheapest possible one costs {describe(min(s.cost for s in frontier))}")
    return min(feasible, key=lambda s: (s.error, s.cost))


def no_student_fits(budget: str, cheapest: str) -> SynthkdError:
    return SynthkdError(f"no student fits the budget of {budget}: {cheapest}; "
                        "raise the budget or add cheaper candidates (narrower widths, fewer blocks, sparsity)")
