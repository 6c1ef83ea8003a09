"""``log``: Chen et al. 2016, Section 4.3 ("recursion"): O(log n) memory, O(n log n) compute.

The forward order is cut at every local minimum of the crossing bytes (in a chain: between
every two layers). Backward over segments [l, r) recomputes the forward from the cut at
``l`` up to the cut at the middle, recurses into the right half, then into the left half, which
recomputes again from ``l``. The forward pass itself keeps the cuts on the right spine of the
recursion (n/2, 3n/4, ...), so only left halves are recomputed. At most one cut per level is
live: memory grows with log n.
"""

from __future__ import annotations

from memplan.graph import JointGraph, Phase
from memplan.program import Program, build_program, complete_saved_set, forward_order
from memplan.solvers.base import SolverConfig, StepSchedule, evaluate
from memplan.solvers.segments import Cuts, find_cuts


def _boundaries(cuts: Cuts) -> list[int]:
    """Every local minimum of the crossing bytes: in a chain, the point between two layers."""
    sizes = cuts.crossing_bytes
    return [p for p in range(len(sizes) - 1)
            if sizes[p] <= sizes[p + 1] and (p == 0 or sizes[p] <= sizes[p - 1])]


def _right_spine(count: int) -> list[int]:
    """Boundary indices the forward keeps: the middles of [0, n), [n/2, n), [3n/4, n), ..."""
    spine, low = [], 0
    while count - low > 1:
        middle = (low + count) // 2
        spine.append(middle)
        low = middle
    return spine


class _Emitter:
    """Builds the backward order, recomputing from the nearest value still in scope."""

    def __init__(self, graph: JointGraph, cuts: Cuts, boundaries: list[int], saved: frozenset[str],
                 recomputed: list[str]):
        self.graph, self.cuts = graph, cuts
        needed = set(recomputed)  # a cut value nothing in backward needs is not rebuilt
        self.boundary_sets = [cuts.keep([p]) & needed for p in boundaries]
        self.order: list[str] = []
        self.ready = set(saved) | {n.name for n in graph.nodes if n.phase in (Phase.PRIMAL, Phase.TANGENT)}

    def materialize(self, names: set[str], scope: set[str]) -> None:
        pending, frontier = set(), list(names)
        while frontier:
            name = frontier.pop()
            if name in pending or name in scope or name in self.ready:
                continue
            pending.add(name)
            frontier.extend(self.graph[name].inputs)
        for name in sorted(pending, key=self.graph.index.__getitem__):
            self.order.append(name)
            scope.add(name)

    def backward(self, groups: list[list[str]], low: int, high: int, scope: set[str]) -> None:
        if high - low == 1:
            scope = set(scope)
            for name in groups[low]:
                forward_inputs = {i for i in self.graph[name].inputs
                                  if self.graph[i].phase is Phase.FORWARD}
                self.materialize(forward_inputs, scope)
                self.order.append(name)
                self.ready.add(name)
            return
        middle = (low + high) // 2
        cut = self.boundary_sets[middle - 1]
        temporary = set(scope)
        self.materialize(cut, temporary)
        self.backward(groups, middle, high, scope | cut)
        self.backward(groups, low, middle, scope | cut)


def _segment_groups(graph: JointGraph, cuts: Cuts, single_level: Program,
                    boundaries: list[int]) -> list[list[str]]:
    """Backward nodes per segment, in the single-level order, segments never increasing."""
    segment_of_position = []
    segment = 0
    for p in range(len(cuts.order)):
        segment_of_position.append(segment)
        if segment < len(boundaries) and p == boundaries[segment]:
            segment += 1
    groups: list[list[str]] = [[] for _ in range(len(boundaries) + 1)]
    current = len(boundaries)
    for name in single_level.backward:
        node = graph[name]
        if node.phase is not Phase.BACKWARD:
            continue
        segments = [segment_of_position[cuts.position[i]] for i in node.inputs
                    if i in cuts.position]
        current = min(current, max(segments, default=current))
        groups[current].append(name)
    return groups


def solve(graph: JointGraph, budget_bytes: int, *, config: SolverConfig) -> StepSchedule:
    cuts = find_cuts(graph)
    boundaries = _boundaries(cuts)
    all_cuts = build_program(graph, cuts.keep(boundaries))
    groups = _segment_groups(graph, cuts, all_cuts, boundaries)
    spine = [boundaries[i - 1] for i in _right_spine(len(groups))]
    saved, recomputed = complete_saved_set(graph, cuts.keep(spine))
    emitter = _Emitter(graph, cuts, boundaries, saved, recomputed)
    emitter.backward(groups, 0, len(groups), set())
    program = Program(forward=forward_order(graph, saved),
                      saved=tuple(sorted(saved, key=graph.index.__getitem__)),
                      backward=tuple(emitter.order))
    return evaluate(graph, program, budget_bytes, method="log", config=config)
