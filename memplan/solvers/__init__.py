"""Solvers: which forward values backward keeps, and which it recomputes.

Every solver is a pure function of the IR with one signature,
``solve(graph, budget_bytes, *, config) -> StepSchedule``, registered by name; ``auto`` runs
them all and keeps the cheapest schedule that fits.
"""

from memplan.solvers.base import SolverConfig, StepSchedule, evaluate
from memplan.solvers.registry import SOLVERS, solve, solve_auto

__all__ = ["SOLVERS", "SolverConfig", "StepSchedule", "evaluate", "solve", "solve_auto"]
