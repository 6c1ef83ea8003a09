"""Cuts of the forward graph (memplan.solvers.segments) on a hand-built chain with a buffer
update, as inductor's decompositions leave BatchNorm's: the running statistic is computed early
and written into its buffer at the forward's end.

    x -> a -> b -> c (output)       a -> stat -> write(buf, stat)       backward: gb(t, b), ga(gb, a)
"""

from __future__ import annotations

from memplan.graph import Category, JointGraph, Node, Phase, Storage
from memplan.solvers.segments import find_cuts

LAYOUT = [  # name, phase, inputs, storage, extra fields
    ("x", Phase.PRIMAL, (), 0, {}),
    ("buf", Phase.PRIMAL, (), 1, {"mutated": True}),
    ("a", Phase.FORWARD, ("x",), 2, {}),
    ("stat", Phase.FORWARD, ("a",), 3, {}),
    ("b", Phase.FORWARD, ("a",), 4, {}),
    ("c", Phase.FORWARD, ("b",), 5, {}),
    ("write", Phase.FORWARD, ("buf", "stat"), 1, {"mutates": True}),
    ("t", Phase.TANGENT, (), 6, {}),
    ("gb", Phase.BACKWARD, ("t", "b"), 7, {}),
    ("ga", Phase.BACKWARD, ("gb", "a"), 8, {}),
]
CATEGORIES = [Category.INPUT, Category.BUFFER, *[Category.ACTIVATION] * 4, Category.TEMPORARY,
              Category.TEMPORARY, Category.GRADIENT]


def graph() -> JointGraph:
    return JointGraph(
        nodes=tuple(Node(name=name, phase=phase, inputs=inputs, storages=(storage,), **extra)
                    for name, phase, inputs, storage, extra in LAYOUT),
        storages=tuple(Storage(1024, category) for category in CATEGORIES),
        forward_outputs=("write", "c"), user_output_count=1, backward_outputs=("ga",))


def test_a_buffer_update_crosses_no_cut():
    """The update runs once and is never recomputed: the statistic it writes is needed past no
    position, so each position of the chain is a one-value cut (on ResNet-1001's compiled
    graph, the statistics crossing every later position made finding cuts quadratic)."""
    cuts = find_cuts(graph())
    crossing = dict(zip(cuts.order, cuts.crossing))
    assert crossing == {"a": ("a",), "stat": ("a",), "b": ("b",), "c": (), "write": ()}
    assert dict(zip(cuts.order, cuts.crossing_bytes)) == {"a": 1024, "stat": 1024, "b": 1024,
                                                         "c": 0, "write": 0}
