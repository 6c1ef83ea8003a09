"""Cuts of the forward graph: what must be kept so that recomputation can start there.

At a position p of the forward order, the *crossing set* is every forward value computed at or
before p and read by a forward node after p, other than a buffer's update (it runs once and is
never recomputed). Saving it is enough to recompute anything after p
without going further back: it is a cut. In a chain the crossing set is one tensor; in a
DenseNet block it is every feature map so far (so saving it and recomputing the concatenations
is the memory-efficient DenseNet); parameters and inputs never count, their owners hold them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from memplan.graph import JointGraph, Phase


@dataclass(frozen=True)
class Cuts:
    graph: JointGraph
    order: tuple[str, ...]  # forward nodes in joint order
    crossing: tuple[tuple[str, ...], ...]  # crossing set after each position
    crossing_bytes: tuple[int, ...]
    allocated_bytes: tuple[int, ...]  # bytes each forward node allocates

    @cached_property
    def position(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.order)}

    def keep(self, boundaries: list[int]) -> set[str]:
        """The values to save for cuts at these positions (tuples replaced by their outputs)."""
        kept: set[str] = set()
        for p in boundaries:
            for name in self.crossing[p]:
                if self.graph[name].is_tensor:
                    kept.add(name)
                else:
                    kept.update(self.graph.users[name])
        return kept


def find_cuts(graph: JointGraph) -> Cuts:
    forward = [n for n in graph.nodes_of(Phase.FORWARD)]
    order = tuple(n.name for n in forward)
    position = {name: i for i, name in enumerate(order)}
    last_use = {name: i for i, name in enumerate(order)}
    for i, node in enumerate(forward):
        if node.mutates:  # a buffer's update: runs once, never recomputed, so reads past no cut
            continue
        for src in node.inputs:
            if src in position:
                last_use[src] = max(last_use[src], i)
    resident = graph._primal_storages
    allocated = tuple(sum(graph.storages[s].nbytes for s in graph.allocates[n.name]
                          if s not in resident) for n in forward)
    ends: dict[int, list[str]] = {}
    for name, end in last_use.items():
        ends.setdefault(end, []).append(name)
    live: dict[str, None] = {}
    crossing, crossing_bytes = [], []
    for i, name in enumerate(order):
        live[name] = None
        for done in ends.get(i, ()):
            live.pop(done, None)
        crossing.append(tuple(live))
        storages = {s for n in live for s in graph[n].storages if s not in resident}
        crossing_bytes.append(sum(graph.storages[s].nbytes for s in storages))
    return Cuts(graph, order, tuple(crossing), tuple(crossing_bytes), allocated)


def local_minima(cuts: Cuts) -> list[int]:
    """Every local minimum of the crossing bytes: in a chain, the point between two layers."""
    sizes = cuts.crossing_bytes
    return [p for p in range(len(sizes) - 1)
            if sizes[p] <= sizes[p + 1] and (p == 0 or sizes[p] <= sizes[p - 1])]


def cheapest_cut(cuts: Cuts, start: int, stop: int) -> int:
    """The position in [start, stop) with the fewest crossing bytes; ties go to the latest."""
    return min(range(start, stop), key=lambda p: (cuts.crossing_bytes[p], -p))
