"""``chen-greedy``: Chen et al. 2016, Algorithm 3 (memory-planned checkpointing) with its grid
search over the segment budget ``b``.

Walk the forward order accumulating the bytes each node allocates; once more than ``b`` has
accumulated since the last cut, cut at the cheapest position since it. Each ``b`` of a geometric
grid gives one program; the cheapest one that fits the budget wins (the smallest peak when none
fits, so that the caller can name the minimum).
"""

from __future__ import annotations

import itertools

from memplan.graph import JointGraph
from memplan.solvers.base import (SolverConfig, StepSchedule, evaluate_all, in_cost_order,
                                  least_peak, recompute_seconds, single_level, that_may_fit)
from memplan.solvers.segments import Cuts, cheapest_cut, find_cuts


def greedy_boundaries(cuts: Cuts, segment_bytes: float) -> list[int]:
    boundaries: list[int] = []
    start, accumulated = 0, 0
    for p, nbytes in enumerate(cuts.allocated_bytes):
        accumulated += nbytes
        if accumulated > segment_bytes and p > start:
            cut = cheapest_cut(cuts, start, p + 1)
            boundaries.append(cut)
            start = cut + 1
            accumulated = sum(cuts.allocated_bytes[start:p + 1])
    return boundaries


def segment_budgets(cuts: Cuts, points: int) -> list[float]:
    total = max(1, sum(cuts.allocated_bytes))
    smallest = max(1.0, total / max(1, len(cuts.order)))
    if points <= 1:
        return [total]
    ratio = (total / smallest) ** (1 / (points - 1))
    return [smallest * ratio ** i for i in range(points)]


def solve(graph: JointGraph, budget_bytes: int, *, config: SolverConfig) -> StepSchedule:
    cuts = find_cuts(graph)
    times = config.node_time_s
    candidates = single_level(graph, (cuts.keep(greedy_boundaries(cuts, segment_bytes))
                                      for segment_bytes in segment_budgets(cuts, config.grid_points)),
                              times)
    # Cheapest first, so that only the first that fits, and those as cheap, are simulated whole.
    programs = in_cost_order(graph, that_may_fit(graph, candidates, budget_bytes), times)
    schedules = evaluate_all(graph, programs, budget_bytes, method="chen-greedy", config=config,
                             first_fit=True)
    if schedules:
        tied = itertools.takewhile(
            lambda p: recompute_seconds(graph, p, times) == schedules[0].recompute_s, programs)
        fitting = schedules + evaluate_all(graph, tied, budget_bytes, method="chen-greedy",
                                           config=config)
        return min(fitting, key=lambda s: (s.recompute_s, s.peak_bytes))
    return least_peak(graph, candidates, budget_bytes, method="chen-greedy", config=config)
