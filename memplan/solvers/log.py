"""``log``: Chen et al. 2016, Section 4.3 ("recursion"): O(log n) memory, O(n log n) compute.

The forward order is cut at every local minimum of the crossing bytes (in a chain: between
every two layers). Backward over segments [l, r) recomputes the forward from the cut at
``l`` up to the cut at the middle, recurses into the right half, then into the left half, which
recomputes again from ``l``: a tree of bisecting splits (``recursive``). The forward pass itself
keeps the cuts on the right spine of the recursion (n/2, 3n/4, ...), so only left halves are
recomputed. At most one cut per level is live: memory grows with log n.
"""

from __future__ import annotations

from memplan.graph import JointGraph
from memplan.program import build_program, complete_saved_set
from memplan.solvers.base import SolverConfig, StepSchedule, evaluate
from memplan.solvers.recursive import Leaf, Split, Tree, emit, make_stages
from memplan.solvers.segments import find_cuts, local_minima


def bisection(low: int, high: int) -> Tree:
    if high - low == 1:
        return Leaf(low)
    middle = (low + high) // 2
    return Split(middle, right=bisection(middle, high), left=bisection(low, middle))


def _spine_cuts(tree: Tree) -> list[int]:
    """The stages whose starting cut the forward keeps: the splits down the right spine."""
    spine = []
    while isinstance(tree, Split):
        spine.append(tree.stage)
        tree = tree.right
    return spine


def solve(graph: JointGraph, budget_bytes: int, *, config: SolverConfig) -> StepSchedule:
    cuts = find_cuts(graph)
    boundaries = local_minima(cuts)
    stages = make_stages(graph, cuts, boundaries, build_program(graph, cuts.keep(boundaries)))
    tree = bisection(0, stages.count)
    keep = set().union(*(stages.cut_before(k) for k in _spine_cuts(tree)))
    saved, recomputed = complete_saved_set(graph, keep)
    program = emit(graph, stages, tree, saved, recomputed)
    return evaluate(graph, program, budget_bytes, method="log", config=config)
