"""What the executor runs for a given saved set: the forward order and the backward order.

This mirrors, node for node, the graphs that ``memplan.passes.partition`` builds, so that the
simulator in :mod:`memplan.liveness` predicts the memory of the code that really runs:

1. Complete the saved set: every primal that backward reaches is saved (it costs nothing, its
   owner holds it), and so is every random value (recomputing it would draw new numbers).
2. Backward computes every value it needs and does not receive as an input: the recompute set.
3. Forward runs, in joint order, the nodes that produce its outputs and the saved values.
4. Backward runs in the order the autograd engine would: walking the backward nodes in joint
   order, each one is preceded by the not-yet-computed nodes it depends on, in joint order, so
   a recomputation happens just before its first use (``reordering_to_mimic_autograd_engine``).

A backward order may name a forward node more than once (recursive schedules recompute a value
again after freeing it); every use then reads the latest computation.

A saved value may also be offloaded (:class:`Transfer`): copied to host memory as it is made,
its device copy dropped once the copy is done, and copied back ahead of its first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from memplan.graph import JointGraph, Node, Phase


@dataclass(frozen=True)
class Transfer:
    """One offloaded saved value: where the device copy ends and where it comes back."""

    name: str
    free_after: str  # forward node after which the device waits for the copy and drops the value
    fetch_after: int  # backward step after which the copy back starts; -1: before backward


@dataclass(frozen=True)
class Program:
    forward: tuple[str, ...]
    saved: tuple[str, ...]  # forward values handed to backward, in joint order
    backward: tuple[str, ...]
    offloaded: tuple[Transfer, ...] = ()  # saved values that wait in host memory

    @property
    def recomputed(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        saved = set(self.saved)
        for name in self.backward:
            if name not in saved:
                seen.setdefault(name, None)
        return tuple(seen)


def candidates(graph: JointGraph) -> list[Node]:
    """Forward tensor values a schedule may choose to save."""
    return [n for n in graph.nodes_of(Phase.FORWARD) if n.is_tensor]


def must_save(graph: JointGraph, node: Node) -> bool:
    """Recomputing it would change it: it is random, or it reads a buffer the step mutates."""
    return node.name in graph.unrecomputable


def complete_saved_set(graph: JointGraph, keep: Iterable[str]) -> tuple[frozenset[str], list[str]]:
    """Steps 1 and 2: the saved set backward really receives, and what it recomputes."""
    keep = keep if isinstance(keep, (set, frozenset)) else set(keep)
    inputs_of, savable = graph.recomputable_inputs, graph.savable
    saved: list[str] = []
    recompute: list[str] = []
    stack = list(graph.read_by_backward)  # the backward nodes read these whatever is kept
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        inputs = inputs_of.get(name)
        if inputs is None or name in keep:
            if name in savable:
                saved.append(name)
        else:
            recompute.append(name)
            stack.extend(inputs)
    index = graph.index
    return frozenset(saved), sorted(recompute, key=index.__getitem__)


def forward_order(graph: JointGraph, saved: frozenset[str]) -> tuple[str, ...]:
    """Step 3: ancestors of the forward outputs, the saved values and the in-place writes
    (buffer updates kept in the graph), in joint order."""
    needed = graph.ancestors(saved, known=graph.needed_by_outputs)
    return tuple(n.name for n in graph.nodes_of(Phase.FORWARD) if n.name in needed)


def backward_order(graph: JointGraph, saved: frozenset[str]) -> tuple[str, ...]:
    """Step 4: the backward nodes, each preceded by what it needs, in joint order."""
    nodes = graph.by_name
    needed: set[str] = set()
    stack = list(graph.backward_outputs)
    while stack:
        name = stack.pop()
        node = nodes[name]
        if name in needed or name in saved or node.phase in (Phase.PRIMAL, Phase.TANGENT):
            continue
        needed.add(name)
        stack.extend(node.inputs)
    index = graph.index
    tangent_users = [index[u] for n in graph.nodes_of(Phase.TANGENT) for u in graph.users[n.name]]
    first_backward = min(tangent_users, default=0)

    order: list[str] = []
    done: set[str] = set()

    def insert(name: str) -> None:
        pending: set[str] = set()
        frontier = [name]
        while frontier:
            current = frontier.pop()
            if current in done or current in pending or current not in needed:
                continue
            pending.add(current)
            frontier.extend(nodes[current].inputs)
        for current in sorted(pending, key=index.__getitem__):
            order.append(current)
            done.add(current)

    ordered = sorted(needed, key=index.__getitem__)
    for name in ordered:
        if name not in done and index[name] >= first_backward:
            insert(name)
    for name in ordered:  # backward nodes that no tangent reaches, e.g. a zero gradient
        if name not in done:
            insert(name)
    return tuple(order)


def build_program(graph: JointGraph, keep: Iterable[str]) -> Program:
    """The single-level program: save ``keep`` (completed), recompute the rest once."""
    saved, _ = complete_saved_set(graph, keep)
    return program_saving(graph, saved)


def program_saving(graph: JointGraph, saved: frozenset[str]) -> Program:
    """The single-level program of a completed saved set (``complete_saved_set``)."""
    return Program(forward=forward_order(graph, saved),
                   saved=tuple(sorted(saved, key=graph.index.__getitem__)),
                   backward=backward_order(graph, saved))


def save_more(graph: JointGraph, program: Program, names: Iterable[str]) -> Program:
    """``program`` with ``names`` (forward values it recomputes) saved instead, its other steps
    in their order: a multi-level schedule keeps its levels, where ``build_program`` of the
    larger saved set would recompute everything once. Recomputations that only the saved
    values needed are dropped, and so are saved values no step reads any more."""
    names = set(names)
    return reading_program(graph, set(program.saved) | names,
                           [n for n in program.backward if n not in names])


def reading_program(graph: JointGraph, saved: Iterable[str], backward: Iterable[str]) -> Program:
    """The program that runs ``backward`` without the recomputations no later step reads
    before the value is computed again, and saves the values of ``saved`` that it still reads.

    A multi-level schedule rebuilds a cut whole, though its next level may need only part of it.
    One pass from the end, over dicts rather than ``graph[...]``: this runs for every candidate
    program of the multi-level solvers."""
    nodes, forward, users = graph.by_name, graph.forward_names, graph.users
    gradients = set(graph.backward_outputs)  # a gradient may be a forward value
    wanted = set(gradients)
    kept: list[str] = []
    for name in reversed(list(backward)):  # a recomputation lives if a later step reads it
        if name in forward and name not in wanted:
            continue
        wanted.discard(name)
        kept.append(name)
        wanted.update(nodes[name].inputs)
    kept.reverse()
    steps = set(kept)
    saved_read = frozenset(name for name in saved if name in gradients
                           or any(user in steps for user in users[name]))
    return Program(forward=forward_order(graph, saved_read),
                   saved=tuple(sorted(saved_read, key=graph.index.__getitem__)),
                   backward=tuple(kept))
