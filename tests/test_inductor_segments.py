"""Segmented compilation: each value is freed after the last segment that reads it, as planned.

The segments here run eagerly (the compile function is the identity), so the test checks the
runner itself: which segment each value reaches, and when it is released.
"""

from __future__ import annotations

import weakref

import torch
from torch.fx.experimental.proxy_tensor import make_fx

import memplan.inductor
from memplan.inductor import compile_in_segments


SCALE = torch.linspace(0.5, 1.5, 8)  # a constant: traced as a get_attr node


def step(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    a = x.sin()  # read by the next op and the last
    b = a.cos().exp()
    variance, mean = torch.var_mean(b, 0)  # one op, two tensors: a segment must not split them
    c = (b - mean) * variance.rsqrt()
    d = c.tanh().relu() * SCALE
    return d + a, mean, SCALE


def test_each_value_is_released_after_its_last_reading_segment():
    x = torch.randn(16, 8)
    graph = make_fx(step)(x)
    returned = {n.name for n in graph.graph.output_node().args[0]}  # held to the end
    segments: list[tuple[list[str], list[str]]] = []  # (inputs, outputs) by name
    alive: dict[str, weakref.ref] = {}
    released_late = []

    def compile_graph(segment: torch.fx.GraphModule, _examples):
        index = len(segments)
        inputs = [n.name for n in segment.graph.find_nodes(op="placeholder")]
        outputs = [n.name for n in segment.graph.output_node().args[0]]
        segments.append((inputs, outputs))

        def run(args: list):
            for name, ref in alive.items():
                if name in returned:
                    continue
                last = max(k for k, (reads, _) in enumerate(segments) if name in reads)
                if last < index and ref() is not None:
                    released_late.append((name, index))
            assert all(isinstance(a, torch.Tensor) for a in args)
            results = segment(*args)
            args.clear()
            alive.update((name, weakref.ref(t)) for name, t in zip(outputs, results))
            return results

        run._boxed_call = True
        return run

    compiled = compile_in_segments(graph, [x], compile_graph, ops_per_segment=2)
    assert len(segments) >= 4
    out = compiled([x])
    for actual, expected in zip(out, step(x)):
        assert torch.equal(actual, expected)
    assert not released_late, f"held past their last reading segment: {released_late}"
    sin = next(n.name for n in graph.graph.nodes if n.target is torch.ops.aten.sin.default)
    readers = [k for k, (reads, _) in enumerate(segments) if sin in reads]
    assert readers == [len(segments) - 1], "sin's value should pass from its segment to the last"


def run_eagerly(segment: torch.fx.GraphModule):
    """The segment as a compiled one is called: boxed, emptying its argument list."""
    def run(args: list):
        results = segment(*args)
        args.clear()
        return results

    run._boxed_call = True
    return run


def update_then_compute(x: torch.Tensor, running: torch.Tensor) -> tuple[torch.Tensor]:
    mean = x.mean(0)
    updated = running * 0.9 + mean * 0.1  # a buffer update, as BatchNorm's running mean
    y = (x - mean).relu().sin().cos().exp().tanh()
    running.copy_(updated)  # written at the end, where aot_autograd leaves buffer writes
    return (y,)


def test_a_buffer_write_joins_the_segment_of_its_value():
    x, running = torch.randn(16, 8), torch.zeros(8)
    graph = make_fx(update_then_compute)(x, running.clone())
    members: list[list] = []

    def compile_graph(segment: torch.fx.GraphModule, _examples):
        members.append([n.target for n in segment.graph.nodes if n.op == "call_function"])
        return run_eagerly(segment)

    compiled = compile_in_segments(graph, [x, running], compile_graph, ops_per_segment=2)
    (out,) = compiled([x, running])
    expected_running = torch.zeros(8)
    (expected,) = update_then_compute(x, expected_running)
    assert torch.equal(out, expected) and torch.equal(running, expected_running)
    copy_, add = torch.ops.aten.copy_.default, torch.ops.aten.add.Tensor
    writer = next(k for k, targets in enumerate(members) if copy_ in targets)
    assert add in members[writer], f"the write left its value's segment: {members}"
    assert writer < len(members) - 1, "the write should not wait for the last segment"


def segments_of(function, *inputs: torch.Tensor, ops_per_segment: int = 100,
                rewrite=lambda graph: None) -> tuple[torch.fx.GraphModule, list[list[str]]]:
    """``function``'s graph, and the op names of each segment it is cut into,
    after checking that the segments compute what ``function`` does. Traced on fake tensors,
    as aot_autograd's graphs are: a view's value shares its base's storage. ``rewrite`` edits
    the traced graph first."""
    graph = make_fx(function, tracing_mode="fake")(*inputs)
    rewrite(graph)
    members: list[list[str]] = []

    def compile_graph(segment: torch.fx.GraphModule, _examples):
        members.append([n.name for n in segment.graph.nodes if n.op == "call_function"])
        return run_eagerly(segment)

    compiled = compile_in_segments(graph, list(inputs), compile_graph, ops_per_segment=ops_per_segment)
    for actual, expected in zip(compiled(list(inputs)), function(*inputs), strict=True):
        assert torch.equal(actual, expected)
    return graph, members


def sum_of_slices_then_other_work(gradient: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    doubled = gradient * 2  # a gradient computed in an earlier segment
    part = doubled[:, :2] + 1  # the last reader of doubled's storage, a tenth of its size
    y = x.exp()  # planned after part, so after doubled is freed
    return y, part.t() @ x


def test_a_value_that_frees_a_storage_ends_its_segment():
    """``part`` frees ``doubled``, ten times its size: its segment ends there, so that inductor
    computes it, and frees ``doubled``, where the plan has it, instead of in the kernel of its
    first reader (which would hold ``doubled`` across ``y``)."""
    graph, members = segments_of(sum_of_slices_then_other_work, torch.randn(8, 20), torch.randn(8, 8))
    add = next(n.name for n in graph.graph.nodes if n.target is torch.ops.aten.add.Tensor)
    assert len(members) == 2 and members[0][-1] == add, f"the sum should end its segment: {members}"


def recompute_then_mask(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    recomputed = (x * 2).relu()
    y = recomputed @ weight  # reads it before the mask
    mask = recomputed <= 0  # its last reader, a quarter of its size
    return y, mask


def recompute_then_masked_gradient(x: torch.Tensor, weight: torch.Tensor,
                                   gradient: torch.Tensor) -> tuple[torch.Tensor, ...]:
    y, mask = recompute_then_mask(x, weight)
    return y, gradient * mask  # the op right after the mask reads it


def test_a_segment_started_by_such_a_value_goes_on_into_the_op_that_reads_it():
    graph, members = segments_of(recompute_then_masked_gradient, torch.randn(16, 16),
                                 torch.randn(16, 4), torch.randn(16, 16))
    names = {n.target: n.name for n in graph.graph.nodes}
    mask, product = names[torch.ops.aten.le.Scalar], names[torch.ops.aten.mul.Tensor]
    assert [mask, product] in members, members


def test_a_value_that_frees_what_its_segment_computed_and_read_starts_a_segment():
    """``mask`` frees ``recomputed``, which its segment computed and the product read: it starts
    a segment, so that inductor cannot write it with ``recomputed`` in one kernel, before the
    product, while ``recomputed`` is still held (as a recomputed ReLU's mask in VGG19)."""
    graph, members = segments_of(recompute_then_mask, torch.randn(16, 16), torch.randn(16, 4))
    mask = next(n.name for n in graph.graph.nodes if n.target is torch.ops.aten.le.Scalar)
    assert [mask] in members, f"the mask should be a segment of its own: {members}"


def recomputed_twice_then_mask(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    earlier = (x * 2).relu()  # a recomputation in the segment before, which the sum ends
    total = earlier.sum()
    again = (x * 2).relu()  # the same value recomputed
    return total, again @ weight, again <= 0


def share_traced_values(graph: torch.fx.GraphModule) -> None:
    """Give the second computation of each op the first one's traced value, as the backward
    graph does, whose recomputations are copies of one node."""
    for op in (torch.ops.aten.mul.Tensor, torch.ops.aten.relu.default):
        first, second = graph.graph.find_nodes(op="call_function", target=op)
        second.meta["val"] = first.meta["val"]


def test_a_value_recomputed_twice_is_freed_by_its_own_segment():
    """The mask frees the second computation of ``(x * 2).relu()``, which its segment computed
    and the product read: it starts a segment, though the first computation, which has the same
    traced storage, was in the segment before."""
    graph, members = segments_of(recomputed_twice_then_mask, torch.randn(16, 16),
                                 torch.randn(16, 4), ops_per_segment=4,
                                 rewrite=share_traced_values)
    mask = next(n.name for n in graph.graph.nodes if n.target is torch.ops.aten.le.Scalar)
    assert [mask] in members, f"the mask should be a segment of its own: {members}"


def loss_of_an_earlier_value_and_a_new_one(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    earlier = x.exp()
    other = x.cos() + 1  # ends the first segment of three ops
    new = x.sin()
    y = earlier @ weight  # reads the earlier value, not the new one
    return y, torch.nn.functional.mse_loss(earlier, new), other


def test_a_freed_storage_read_before_must_also_be_computed_in_the_segment():
    """The loss frees ``earlier``, computed in the segment before and read in its own by the
    product, and ``new``, computed in its own segment and read by nothing else: neither storage
    is both, so no segment starts at the loss."""
    graph, members = segments_of(loss_of_an_earlier_value_and_a_new_one, torch.randn(8, 8),
                                 torch.randn(8, 4), ops_per_segment=3)
    loss = next(n.name for n in graph.graph.nodes if n.target is torch.ops.aten.mse_loss.default)
    sin = next(n.name for n in graph.graph.nodes if n.target is torch.ops.aten.sin.default)
    assert any(loss in names and sin in names for names in members), members


def pool_backward_then_convolution(gradient: torch.Tensor, x: torch.Tensor,
                                   weight: torch.Tensor) -> tuple[torch.Tensor]:
    pooled = torch.ops.aten.avg_pool2d_backward(gradient, x, [2, 2], [2, 2], [0, 0], False, True,
                                                None)
    return (torch.nn.functional.conv2d(pooled, weight),)


def test_an_input_read_for_its_shape_only_is_not_passed_to_its_segment():
    """``avg_pool2d_backward`` reads ``x`` for its shape only, and inductor would hold an input
    no kernel reads until its segment returns; the segment gets an empty tensor of that shape
    instead, and the result is unchanged."""
    gradient, x, weight = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8), torch.randn(5, 3, 1, 1)
    graph = make_fx(pool_backward_then_convolution)(gradient, x, weight)
    inputs_of: list[list[str]] = []

    def compile_graph(segment: torch.fx.GraphModule, _examples):
        inputs_of.append([n.name for n in segment.graph.find_nodes(op="placeholder")])
        return run_eagerly(segment)

    compiled = compile_in_segments(graph, [gradient, x, weight], compile_graph, ops_per_segment=100)
    (actual,) = compiled([gradient, x, weight])
    assert torch.equal(actual, pool_backward_then_convolution(gradient, x, weight)[0])
    x_name = list(graph.graph.find_nodes(op="placeholder"))[1].name
    assert len(inputs_of) == 1 and x_name not in inputs_of[0], inputs_of


def three_layers(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                 w3: torch.Tensor) -> tuple[torch.Tensor]:
    for w in (w1, w2, w3):
        x = (x @ w).relu().sin()
    return (x,)


def test_identical_segments_are_compiled_once():
    """The first two layers are the same ops on the same shapes: one compilation runs both.
    The third has another shape and is compiled apart."""
    x, w1, w2, w3 = torch.randn(16, 8), torch.randn(8, 8), torch.randn(8, 8), torch.randn(8, 4)
    graph = make_fx(three_layers)(x, w1, w2, w3)
    compiled_shapes: list[list[tuple]] = []

    def compile_graph(segment: torch.fx.GraphModule, examples):
        compiled_shapes.append([tuple(e.shape) for e in examples])
        return run_eagerly(segment)

    compiled = compile_in_segments(graph, [x, w1, w2, w3], compile_graph, ops_per_segment=3)
    (actual,) = compiled([x, w1, w2, w3])
    assert torch.equal(actual, three_layers(x, w1, w2, w3)[0])
    assert compiled_shapes == [[(16, 8), (8, 8)], [(16, 8), (8, 4)]], compiled_shapes


def scaled_layers(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
    for scale in (2.0, 3.0):
        x = (x @ w).relu() * scale
    return (x,)


def test_segments_that_differ_in_a_scalar_are_compiled_apart():
    x, w = torch.randn(16, 8), torch.randn(8, 8)
    graph = make_fx(scaled_layers)(x, w)
    count = 0

    def compile_graph(segment: torch.fx.GraphModule, _examples):
        nonlocal count
        count += 1
        return run_eagerly(segment)

    compiled = compile_in_segments(graph, [x, w], compile_graph, ops_per_segment=3)
    (actual,) = compiled([x, w])
    assert torch.equal(actual, scaled_layers(x, w)[0])
    assert count == 2


def offset_layers(x: torch.Tensor, w: torch.Tensor, offset: int) -> tuple[torch.Tensor]:
    for _ in range(offset):  # ops before the layers: the layers start at another op
        x = x.neg()
    for _ in range(40):  # five different ops per layer
        x = ((x @ w).relu().sin() * 2.0).tanh()
    return (x,)


def test_segments_cut_by_content_repeat_whatever_the_offset(monkeypatch):
    """Cut every 12 ops, five-op layers fall alike only every 60 ops. Cut where the last ops'
    content says (past 9 ops), they fall alike in every segment but the first, whatever the ops
    before them: far fewer compilations for about as many segments, none over 12 ops, the same
    results. (The content of these layers ends no segment at memplan's spacing of 8, which
    would leave the cuts as they were: the test takes 4.)"""
    x, w = torch.randn(16, 8), torch.randn(8, 8)
    keys: list[str] = []
    segment_key = memplan.inductor._segment_key
    monkeypatch.setattr(memplan.inductor, "CONTENT_SPACING", 4)
    monkeypatch.setattr(memplan.inductor, "_segment_key",
                        lambda *args: keys.append(segment_key(*args)) or keys[-1])

    def segments_and_compilations(offset: int, min_ops: int | None) -> tuple[int, int]:
        graph = make_fx(lambda x, w: offset_layers(x, w, offset))(x, w)
        keys.clear()
        compilations = 0

        def compile_graph(segment: torch.fx.GraphModule, _examples):
            nonlocal compilations
            compilations += 1
            assert sum(n.op == "call_function" for n in segment.graph.nodes) <= 12
            return run_eagerly(segment)

        compiled = compile_in_segments(graph, [x, w], compile_graph, ops_per_segment=12,
                                       min_ops_per_segment=min_ops)
        (actual,) = compiled([x, w])
        assert torch.equal(actual, offset_layers(x, w, offset)[0])
        return len(keys), compilations

    for offset in range(3):
        fixed_segments, fixed = segments_and_compilations(offset, None)
        content_segments, by_content = segments_and_compilations(offset, 9)
        assert by_content <= fixed / 2, (offset, by_content, fixed)
        assert content_segments <= 1.25 * fixed_segments, (offset, content_segments, fixed_segments)
