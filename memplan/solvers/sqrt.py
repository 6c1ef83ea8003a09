"""``sqrt``: Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost", Section 4.1.

Split the n forward nodes into about sqrt(n) segments, keep only the cut at each segment end,
and recompute each segment once in backward: O(sqrt(n)) memory for one extra forward. Each
boundary is the cheapest cut within its window of the even split.
"""

import math

from memplan.graph import JointGraph
from memplan.program import build_program
from memplan.solvers.base import SolverConfig, StepSchedule, evaluate
from memplan.solvers.segments import cheapest_cut, find_cuts


def sqrt_boundaries(n: int) -> list[tuple[int, int]]:
    """Windows [start, stop) of the forward order in which each boundary is sought."""
    segments = max(1, round(math.sqrt(n)))
    length = n / segments
    return [(max(0, int((i - 0.5) * length)), min(n, int((i + 0.5) * length)))
            for i in range(1, segments)]


def solve(graph: JointGraph, budget_bytes: int, *, config: SolverConfig) -> StepSchedule:
    cuts = find_cuts(graph)
    boundaries = [cheapest_cut(cuts, start, stop)
                  for start, stop in sqrt_boundaries(len(cuts.order)) if stop > start]
    program = build_program(graph, cuts.keep(boundaries))
    return evaluate(graph, program, budget_bytes, method="sqrt", config=config)
