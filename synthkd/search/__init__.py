"""Student Search: distill candidate pieces per neighbourhood once, then pick the least-error
student under a budget (an exact multiple-choice knapsack) and merge it."""

from .costs import KINDS, Budget, parse_budget
from .explore import Exploration, Option
from .knapsack import Solution, pareto_frontier, select
from .space import DEFAULT_CANDIDATES, Candidate, candidate_space

__all__ = ["KINDS", "Budget", "Candidate", "DEFAULT_CANDIDATES", "Exploration", "Option", "Solution", "candidate_space",
           "pareto_frontier", "parse_budget", "select"]
