"""A compiled step's simulation counts the kernels inductor fuses, worked out by hand; and the
compiled path keeps each pair of steps it counted on in one segment, where inductor sees both.

    x -> a (extern) -> b (pointwise) -> c (pointwise) -> d (extern, output)
    backward: gx(t)

Each value is one 1 MiB float32 storage. Run op by op (eager) the forward holds 2, 3, 3, 3 MiB.
Compiled, b is computed inside c's kernel (its one reader, pointwise): it is never allocated, and
a lives until c runs; c then writes its value over a, which dies there, of its dtype and size:
2, 2, 2, 3 MiB.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import memplan
import memplan.inductor
from harness import Case, eager_twin
from memplan.graph import Category, JointGraph, Node, Phase, Storage
from memplan.liveness import simulate
from memplan.program import Program
from test_compile import assert_steps_match

MiB = 2**20

LAYOUT = [  # name, phase, inputs, pointwise, category
    ("x", Phase.PRIMAL, (), False, Category.INPUT),
    ("a", Phase.FORWARD, ("x",), False, Category.ACTIVATION),
    ("b", Phase.FORWARD, ("a",), True, Category.ACTIVATION),
    ("c", Phase.FORWARD, ("b",), True, Category.ACTIVATION),
    ("d", Phase.FORWARD, ("c",), False, Category.ACTIVATION),
    ("t", Phase.TANGENT, (), False, Category.TEMPORARY),
    ("gx", Phase.BACKWARD, ("t",), False, Category.GRADIENT),
]
PROGRAM = Program(forward=("a", "b", "c", "d"), saved=(), backward=("gx",))


def chain(compiled: bool, **changes: dict) -> JointGraph:
    """The chain above; ``changes`` replaces a node's fields by name."""
    nodes = [Node(name=name, phase=phase, inputs=inputs, storages=(i,), pointwise=pointwise,
                  op="aten.mul.Tensor" if pointwise else "aten.mm.default", dense=True)
             for i, (name, phase, inputs, pointwise, _) in enumerate(LAYOUT)]
    nodes = [dataclasses.replace(node, **changes.get(node.name, {})) for node in nodes]
    return JointGraph(nodes=tuple(nodes),
                      storages=tuple(Storage(MiB, category, "float32") for *_, category in LAYOUT),
                      forward_outputs=("d",), user_output_count=1, backward_outputs=("gx",),
                      compiled=compiled)


@pytest.mark.parametrize("compiled, forward_mib, fused", [
    (False, [2, 3, 3, 3], ()),
    (True, [2, 2, 2, 3], ((1, 2), (0, 2))),  # b inside c's kernel; c written over a
])
def test_compiled_step_counts_fused_kernels_by_hand(compiled, forward_mib, fused):
    timeline = simulate(chain(compiled), PROGRAM)
    # Backward: x, d (the output) and the tangent are live as gx is written: 4 MiB.
    assert list(timeline.live_bytes) == [n * MiB for n in forward_mib + [4]]
    assert timeline.fused == fused


def test_a_value_read_twice_is_written_out():
    """d reads b as well as c: inductor writes b out, over a, which dies there; c, read by an
    extern kernel, is written out too, beside b: 2, 2, 3, 4 MiB (eager: 2, 3, 3, 4)."""
    graph = chain(True, d={"inputs": ("b", "c")})
    timeline = simulate(graph, PROGRAM)
    assert [n // MiB for n in timeline.live_bytes[:4]] == [2, 2, 3, 4]
    assert timeline.fused == ((0, 1),)


@pytest.mark.parametrize("view, forward_mib, fused", [
    ("aten.view.default", [2, 2, 2, 3], ((0, 2),)),  # read as laid out: written over
    ("getitem", [2, 2, 2, 3], ((0, 2),)),  # one output of a multi-output op: as laid out
    ("aten.permute.default", [2, 2, 3, 3], ()),  # read transposed: inductor writes anew
])
def test_write_over_only_what_is_read_as_laid_out(view, forward_mib, fused):
    """b is a view of a (its storage, nothing allocated) that c reads: c writes over a only if
    the view keeps a's order, as a transpose made contiguous does not."""
    graph = chain(True, b={"op": view, "pointwise": False, "storages": (1,)})
    timeline = simulate(graph, PROGRAM)
    assert [n // MiB for n in timeline.live_bytes[:4]] == forward_mib
    assert timeline.fused == fused


def test_no_write_over_what_is_also_read_transposed():
    """c reads a both as laid out and through a transpose (b): inductor writes anew."""
    graph = chain(True, b={"op": "aten.permute.default", "pointwise": False, "storages": (1,)},
                  c={"inputs": ("a", "b")})
    timeline = simulate(graph, PROGRAM)
    assert [n // MiB for n in timeline.live_bytes[:4]] == [2, 2, 3, 3]
    assert timeline.fused == ()


def test_no_write_over_another_dtype():
    graph = chain(True)
    storages = list(graph.storages)
    storages[1] = Storage(MiB, Category.ACTIVATION, "int32")  # a: of a dtype c is not
    graph = dataclasses.replace(graph, storages=tuple(storages))
    timeline = simulate(graph, PROGRAM)
    assert [n // MiB for n in timeline.live_bytes[:4]] == [2, 2, 3, 3]
    assert timeline.fused == ((1, 2),)


def test_no_write_over_an_input_of_the_graph():
    """c reads the resident input x, not a value of the graph: inductor does not write over it."""
    graph = chain(True, b={"inputs": ("x",)}, c={"inputs": ("b",)})
    timeline = simulate(graph, Program(forward=("a", "b", "c", "d"), saved=(), backward=("gx",)))
    assert (0, 2) not in timeline.fused


@pytest.mark.parametrize("s2_reads, forward_mib", [
    (("s1", "r"), [2, 3, 4, 4, 4, 4, 4]),  # s2 in s1's kernel: q, dead at s1, freed after s2
    (("v", "r"), [2, 3, 4, 4, 4, 4, 4]),  # the same through a view of s1
    (("r",), [2, 3, 4, 4, 3, 3, 4]),  # s2 reads nothing s1's kernel writes: a kernel of its own
])
def test_inputs_dying_in_a_fused_kernel_are_freed_after_it(s2_reads, forward_mib):
    """p, q, r (extern) -> s1 = p + q, v = s1.view(...), s2 = v + r (pointwise; s1 and s2 read
    by d, so written out) -> d (extern, output). Inductor computes s1 and s2 in one kernel,
    writing s1 over p and s2 over r, and frees q, whose last reader is s1, only after that
    kernel."""
    names = ("x", "p", "q", "r", "s1", "v", "s2", "d", "t", "gx")
    inputs = {"p": ("x",), "q": ("x",), "r": ("x",), "s1": ("p", "q"), "v": ("s1",),
              "s2": s2_reads, "d": ("s1", "s2"), "gx": ("t",)}
    phase = {"x": Phase.PRIMAL, "t": Phase.TANGENT, "gx": Phase.BACKWARD}
    op = {"s1": "aten.add.Tensor", "s2": "aten.add.Tensor", "v": "aten.view.default"}
    nodes = tuple(Node(name=name, phase=phase.get(name, Phase.FORWARD), inputs=inputs.get(name, ()),
                       storages=(names.index("s1") if name == "v" else i,),
                       pointwise=name in ("s1", "s2"), op=op.get(name, "aten.mm.default"),
                       dense=True) for i, name in enumerate(names))
    graph = JointGraph(nodes=nodes, storages=tuple(Storage(MiB, Category.ACTIVATION, "float32")
                                                   for _ in names),
                       forward_outputs=("d",), user_output_count=1, backward_outputs=("gx",),
                       compiled=True)
    timeline = simulate(graph, Program(forward=names[1:8], saved=(), backward=("gx",)))
    assert [n // MiB for n in timeline.live_bytes[:7]] == forward_mib


def test_compiled_segments_keep_fused_steps_together(monkeypatch):
    """In segments of three ops, cut wherever three are reached, the steps the plan counted as
    one kernel's still share a segment (``compile_in_segments`` checks each pair), and the
    step equals eager's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10))
    case = Case(model, (torch.randn(4, 3, 8, 8),))
    eager = eager_twin(case)
    monkeypatch.setattr(memplan.inductor, "OPS_PER_SEGMENT", 3)
    pairs = []
    check = memplan.inductor._check_fused_together

    def recording(segment_of):
        pairs.extend((node, step) for node in segment_of
                     for step in node.meta.get(memplan.inductor.FUSED_WITH, ()))
        check(segment_of)
    monkeypatch.setattr(memplan.inductor, "_check_fused_together", recording)
    plan = memplan.optimize(model, "1GB", example_inputs=case.args, method="sqrt", compile=True)
    assert_steps_match(plan.module, case, eager)  # the backward compiles in the first step
    assert plan._result().chosen.timeline.fused
    assert len(pairs) == len(plan._result().chosen.timeline.fused)
