"""An oracle for the simulator: a hand-built four-layer chain of 1 MiB values, whose live bytes
at every step are worked out below by hand from the rules in memplan.liveness's docstring.

    x -> a -> b -> c -> d (output)          backward: gc(t, c), gb(gc, b), ga(gb, a), gx(ga)

x is the resident input, t the tangent of d, gx the gradient of x. Each value is one 1 MiB
storage (a 512x512 fp32 tensor), so every live total is a whole number of MiB.
"""

from __future__ import annotations

import pytest

from memplan.graph import Category, JointGraph, Node, Phase, Storage
from memplan.liveness import simulate
from memplan.program import Program, build_program

MiB = 512 * 512 * 4
assert MiB == 2**20

LAYOUT = [  # name, phase, inputs, category
    ("x", Phase.PRIMAL, (), Category.INPUT),
    ("a", Phase.FORWARD, ("x",), Category.ACTIVATION),
    ("b", Phase.FORWARD, ("a",), Category.ACTIVATION),
    ("c", Phase.FORWARD, ("b",), Category.ACTIVATION),
    ("d", Phase.FORWARD, ("c",), Category.ACTIVATION),
    ("t", Phase.TANGENT, (), Category.TEMPORARY),
    ("gc", Phase.BACKWARD, ("t", "c"), Category.TEMPORARY),
    ("gb", Phase.BACKWARD, ("gc", "b"), Category.TEMPORARY),
    ("ga", Phase.BACKWARD, ("gb", "a"), Category.TEMPORARY),
    ("gx", Phase.BACKWARD, ("ga",), Category.GRADIENT),
]


@pytest.fixture
def chain() -> JointGraph:
    return JointGraph(
        nodes=tuple(Node(name=name, phase=phase, inputs=inputs, storages=(i,))
                    for i, (name, phase, inputs, _) in enumerate(LAYOUT)),
        storages=tuple(Storage(MiB, category) for *_, category in LAYOUT),
        forward_outputs=("d",), user_output_count=1, backward_outputs=("gx",))


# Save everything backward reads. Forward: x resident, then a, b, c, d accumulate: 2, 3, 4, 5.
# Backward: the tangent arrives (6); gc is written (7), then t and c die (5); gb (6), then gc
# and b die (4); ga (5), then gb and a die (3); gx (4), kept. Peak 7 MiB, writing gc.
SAVE_ALL = Program(forward=("a", "b", "c", "d"), saved=("a", "b", "c"),
                   backward=("gc", "gb", "ga", "gx"))
SAVE_ALL_LIVE = [2, 3, 4, 5, 7, 6, 5, 4]

# Save b only (and x, which recomputing a reads). Forward: a (2), b (3), a dies; c (3);
# d (4), c dies (3: x, b, d). Backward: tangent (4); c recomputed from b (5); gc (6), t and c
# die (4); gb (5), gc and b die (3); a recomputed from x (4); ga (5), gb and a die (3); gx (4).
# Peak 6 MiB: one layer less than saving everything.
SAVE_B = Program(forward=("a", "b", "c", "d"), saved=("x", "b"),
                 backward=("c", "gc", "gb", "a", "ga", "gx"))
SAVE_B_LIVE = [2, 3, 3, 4, 5, 6, 5, 4, 5, 4]


@pytest.mark.parametrize("program, live_mib, peak_mib, peak_step", [
    (SAVE_ALL, SAVE_ALL_LIVE, 7, "backward:gc"),
    (SAVE_B, SAVE_B_LIVE, 6, "backward:gc"),
])
def test_simulated_live_bytes_by_hand(chain, program, live_mib, peak_mib, peak_step):
    timeline = simulate(chain, program)
    assert list(timeline.live_bytes) == [n * MiB for n in live_mib]
    assert timeline.peak_bytes == peak_mib * MiB
    assert timeline.peak_node == peak_step
    assert timeline.steps == tuple([f"forward:{n}" for n in program.forward]
                                   + [f"backward:{n}" for n in program.backward])


@pytest.mark.parametrize("keep, expected", [({"a", "b", "c"}, SAVE_ALL), ({"b"}, SAVE_B)])
def test_programs_are_built_as_worked_out(chain, keep, expected):
    assert build_program(chain, keep) == expected


def test_a_view_adds_no_bytes(chain):
    """Make c a view of b (same storage): computing or recomputing c allocates nothing."""
    nodes = list(chain.nodes)
    nodes[3] = Node(name="c", phase=Phase.FORWARD, inputs=("b",), storages=(2,))
    viewed = JointGraph(nodes=tuple(nodes), storages=chain.storages, forward_outputs=("d",),
                        user_output_count=1, backward_outputs=("gx",))
    # SAVE_B: a (2), b (3), a dies (2); c adds nothing (2); d (3: x, b, d). Backward: tangent
    # arrives; c recomputed, adds nothing (4); gc (5), t dies, c's death frees nothing, b is
    # still read by gb (4); gb (5), gc and b die (3); a (4); ga (5), gb and a die (3); gx (4).
    timeline = simulate(viewed, SAVE_B)
    assert list(timeline.live_bytes) == [n * MiB for n in [2, 3, 2, 3, 4, 5, 5, 4, 5, 4]]
    assert timeline.peak_bytes == 5 * MiB
