"""`no-recompute`: the plain topological order, each value freed after its last use.

Its peak is the reference the benchmark's budgets are fractions of.
"""

from __future__ import annotations

import time

from memplan.remat.graph import Graph
from memplan.remat.registry import SolverConfig, register
from memplan.remat.schedule import Schedule, build, infeasible, replay, events_from_computes


@register("no-recompute")
def solve(problem: Graph, budget_bytes: int, *, config: SolverConfig) -> Schedule:
    start_s = time.perf_counter()
    order = list(range(len(problem)))
    peak, _, _ = replay(problem, events_from_computes(problem, order))
    if peak > budget_bytes:
        return infeasible("no-recompute", f"peak without recomputation is {peak} B > budget {budget_bytes} B", start_s)
    return build(problem, order, method="no-recompute", budget_bytes=budget_bytes, start_s=start_s, gap=0.0)
