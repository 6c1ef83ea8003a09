"""The compiled path: inductor runs the planned graphs; outputs and gradients equal eager's.

Inductor fuses reductions and so rounds differently from eager: values are compared by the
norm of the difference against 1e-5 of eager's norm plus 1e-5 per element (a gradient that
BatchNorm cancels is pure rounding noise); a wrong dropout mask or recomputation is off by
the norm itself. RNG use is compared exactly.
"""

from __future__ import annotations

import pytest
import torch

import memplan
import memplan.inductor
from memplan.graph import Phase
from memplan.passes.dropout import replay
from memplan.sac import op_name
from harness import eager_twin, float_leaves, run_step
from zoo import Case, build

pytest.importorskip("torch._inductor.compile_fx")
NORM_RTOL, ELEMENT_ATOL = 1e-5, 1e-5


def assert_near(actual, expected, what: str, rtol: float = NORM_RTOL) -> None:
    error = (actual.double() - expected.double()).norm().item()
    allowed = rtol * expected.double().norm().item() + ELEMENT_ATOL * expected.numel() ** 0.5
    assert error <= allowed, f"{what}: error norm {error:.2e} > {allowed:.2e}"


def assert_steps_match(module, case, eager, rtol: float = NORM_RTOL) -> None:
    """Two steps: outputs, gradients and RNG use; then the buffers, updated once per step."""
    for seed in (101, 102):
        out, grads, rng = run_step(module, case, seed)
        eager_out, eager_grads, eager_rng = run_step(eager, case, seed)
        for a, b in zip(float_leaves(out), float_leaves(eager_out)):
            assert_near(a, b, "output", rtol)
        grads = {name.removeprefix("_orig_mod."): g for name, g in grads.items()}  # torch.compile's
        for name in eager_grads:
            assert_near(grads[name], eager_grads[name], f"gradient of {name}", rtol)
        assert torch.equal(rng, eager_rng), "RNG use differs from eager"
    buffers = dict(case.model.named_buffers())
    for name, buffer in eager.named_buffers():
        if buffer.is_floating_point():
            assert_near(buffers[name], buffer, f"buffer {name}", rtol)
        else:  # BatchNorm's num_batches_tracked: one per step
            assert torch.equal(buffers[name], buffer), f"buffer {name}: {buffers[name]} != {buffer}"


@pytest.mark.parametrize("name", ["mlp", "nested_io", "gpt2"])
def test_optimize_compile_matches_eager(name):
    case = build(name)
    eager = eager_twin(case)
    plan = memplan.optimize(case.model, 1.0, example_inputs=case.args,
                            example_kwargs=case.kwargs, method="sqrt", compile=True)
    assert plan.program.recomputed, "sqrt should recompute something"
    assert_steps_match(plan.module, case, eager)


def test_torch_compile_backend_matches_eager():
    case = build("mlp")
    eager = eager_twin(case)
    memplan_backend = memplan.backend("1GB", method="sqrt")
    compiled = torch.compile(case.model, backend=memplan_backend, fullgraph=True)
    assert_steps_match(compiled, case, eager)
    assert [plan.chosen.method for plan in memplan_backend.plans] == ["sqrt"]


def test_compiled_saved_values_keep_inductors_layout():
    """Inductor stores some saved values channels-last; the backward must be compiled for the
    strides the compiled forward produces, not eager's. Through 40 convolutions with BatchNorm,
    torch.compile itself differs from eager by 1.7e-4 of a gradient's norm on this CPU, hence
    the looser bound."""
    case = build("densenet40")
    eager = eager_twin(case)
    plan = memplan.optimize(case.model, 1.0, example_inputs=case.args, method="log", compile=True)
    assert plan.program.recomputed
    assert_steps_match(plan.module, case, eager, rtol=1e-3)


def test_compiled_pointwise_plan_recomputes_batch_norms_normalisation():
    """The ``pointwise`` plan saves what BatchNorm's decomposed statistics and the convolutions
    produce, and recomputes the normalisation and the ReLUs inside the backward's kernels. Its
    steps equal those of the compiled plan that recomputes nothing: on this ResNet both differ
    from eager's by 3e-3 of a gradient's norm, rounding that BatchNorm's backward amplifies.
    Inductor's layout optimisation is off, as memplan has it on CUDA: on the CPU it gives
    convolutions channels-last layouts within a segment, which round their gradients otherwise
    (1e-3 of conv.weight's gradient), and the two plans' segments end at different ops."""
    with torch._inductor.config.patch(layout_optimization=False):  # the steps compile backward
        case = build("preact_resnet29")
        twin = eager_twin(case)
        reference = memplan.optimize(twin, 1.0, example_inputs=case.args, method="none",
                                     compile=True)
        plan = memplan.optimize(case.model, 1.0, example_inputs=case.args, method="pointwise",
                                compile=True)
        graph = plan._result().graph
        recomputed = {graph[name].op for name in plan.program.backward
                      if graph[name].phase is Phase.FORWARD}
        assert "aten.relu.default" in recomputed
        assert not any(op.startswith(("aten.convolution", "aten.var_mean")) for op in recomputed)
        assert plan.predicted_peak_bytes < plan.baseline_peak_bytes
        assert_steps_match(plan.module, case, reference.module)


def test_compiled_path_traces_max_pooling_backward_whole():
    """Inductor lowers max-pooling's backward itself; decomposed (a scatter-add over zeros, after
    reshaping copies of a channels-last gradient and its indices) it would add temporaries to
    the plan that inductor fuses away."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.MaxPool2d(3, stride=2), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 5 * 5, 4))
    case = Case(model.to(memory_format=torch.channels_last),
                (torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last),))
    eager = eager_twin(case)
    plan = memplan.optimize(case.model, "1GB", example_inputs=case.args, method="sqrt",
                            compile=True)
    ops = {node.op for node in plan._result().graph.nodes}
    assert "aten.max_pool2d_with_indices_backward.default" in ops
    assert not any(op.startswith("aten.scatter") for op in ops)
    assert_steps_match(plan.module, case, eager)


def test_compiled_plan_saves_the_mask_of_a_relu_that_only_max_pooling_reads():
    """VGG's pattern: a ReLU read by a convolution, then a ReLU read by a max-pooling. Backward
    needs the first ReLU's output (the next convolution's weight gradient reads it), but of the
    second only its sign and its shape. Recomputing nothing, the plan saves the first ReLU's
    output and the second's mask, a quarter of its bytes, and its steps equal eager's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
    case = Case(model.to(memory_format=torch.channels_last),
                (torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last),))
    eager = eager_twin(case)
    plan = memplan.optimize(case.model, 1.0, example_inputs=case.args, method="none", compile=True)
    graph = plan._result().graph
    relus = [n.name for n in graph.nodes if n.op == "aten.relu.default"]
    masks = [n.name for n in graph.nodes_of(Phase.FORWARD) if n.op == "aten.le.Scalar"]
    assert len(relus) == 2 and len(masks) == 1
    assert graph.ancestors([masks[0]]) >= {relus[1]}
    assert relus[0] in plan.program.saved and relus[1] not in plan.program.saved
    assert masks[0] in plan.program.saved
    pooling = next(n for n in graph.nodes if n.op == "aten.max_pool2d_with_indices_backward.default")
    assert relus[1] not in pooling.inputs
    assert_steps_match(plan.module, case, eager)
    with pytest.raises(memplan.InfeasibleBudgetError) as refusal:
        memplan.optimize(case.model, 1, example_inputs=case.args, compile=True)
    least = memplan.optimize(case.model, refusal.value.minimum_bytes, example_inputs=case.args,
                             compile=True)
    assert least.program.recomputed
    assert_steps_match(least.module, case, eager)


def test_compiled_plan_does_not_keep_what_average_pooling_reads_for_its_shape():
    """A DenseNet transition ends in a convolution and an average pooling, whose backward reads
    the convolution's output for its shape alone: recomputing nothing, the plan does not save
    it, and the steps equal eager's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 1), torch.nn.AvgPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 4))
    case = Case(model, (torch.randn(4, 3, 16, 16),))
    eager = eager_twin(case)
    plan = memplan.optimize(case.model, 1.0, example_inputs=case.args, method="none", compile=True)
    graph = plan._result().graph
    transition = [n.name for n in graph.nodes if n.op == "aten.convolution.default"][1]
    assert transition not in plan.program.saved
    assert_steps_match(plan.module, case, eager)


def test_compiled_deep_resnet_matches_eager_in_float64():
    """In float32, rounding alone moves a deep pre-activation ResNet's gradients far (ResNet-1001
    eager, float32 against float64: 0.94 of a gradient's largest magnitude on this CPU), so a
    float32 comparison cannot tell a wrong value from rounding. In float64 the compiled plan,
    recomputing, with BatchNorm's, ReLU's backward's and detach's decompositions copied, equals
    eager's step to 1e-9 of each gradient's largest magnitude (ResNet-164: 4e-12)."""
    built = build("preact_resnet29")
    case = Case(built.model.double(), tuple(arg.double() for arg in built.args))
    eager = eager_twin(case)
    plan = memplan.optimize(case.model, "50%", example_inputs=case.args, compile=True)
    assert plan.program.recomputed
    for seed in (101, 102):
        out, grads, _ = run_step(plan.module, case, seed)
        eager_out, eager_grads, _ = run_step(eager, case, seed)
        for name, value, expected in [("output", out, eager_out),
                                      *((name, grads[name], eager_grads[name]) for name in eager_grads)]:
            error = (value - expected).abs().max().item()
            assert error <= 1e-9 * expected.abs().max().item(), f"{name}: off by {error:.2e}"

def test_repeated_layers_share_compiled_segments(monkeypatch):
    """Twelve identical Linear-BatchNorm-ReLU layers, in segments of five ops, each held open
    until the kernels the plan counted on fusing are in it: most segments reuse an earlier one's
    compilation, with their own weights and buffers, and the step still equals eager's. (A
    bias before BatchNorm has a gradient of zero but for rounding, which twelve layers
    amplify past the tolerance: the layers have none, as is usual.)"""
    torch.manual_seed(0)
    layers = [torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False), torch.nn.BatchNorm1d(16),
                                  torch.nn.ReLU()) for _ in range(12)]
    case = Case(torch.nn.Sequential(*layers, torch.nn.Linear(16, 4)), (torch.randn(32, 16),))
    eager = eager_twin(case)
    keys = []
    segment_key = memplan.inductor._segment_key
    monkeypatch.setattr(memplan.inductor, "OPS_PER_SEGMENT", 5)
    monkeypatch.setattr(memplan.inductor, "_segment_key",
                        lambda *args: keys.append(segment_key(*args)) or keys[-1])
    plan = memplan.optimize(case.model, "1GB", example_inputs=case.args, method="sqrt",
                            compile=True)
    assert plan.program.recomputed
    assert_steps_match(plan.module, case, eager)  # the backward compiles in the first step
    assert len(set(keys)) < len(keys) / 2, f"{len(set(keys))} compilations for {len(keys)} segments"


def test_compiled_step_updates_buffers_inside_its_graphs():
    """BatchNorm's running statistics are written by the compiled forward, not copied back one
    Python call each by aot_autograd's runtime; the planner still knows which buffers the step
    writes (a value that reads one after its update must not be recomputed)."""
    from torch.profiler import ProfilerActivity, profile

    case = build("mlp")
    plan = memplan.optimize(case.model, "1GB", example_inputs=case.args, method="sqrt",
                            compile=True)
    assert sum(node.mutated for node in plan._result().graph.nodes) == 3 * 4  # 4 BatchNorm1d
    run_step(plan.module, case, 101)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_step(plan.module, case, 102)
    outside = [e.name for e in prof.events() if e.cpu_parent is None and e.name == "aten::copy_"]
    assert not outside, f"{len(outside)} buffer copies outside the compiled graphs"


def test_compiled_plans_replay_dropout_masks():
    """Dropout masks are replayed from their generator state on the compiled path too (inductor
    calls memplan's draw and replay ops), so at the least budget they are recomputed, not saved,
    and the compiled step still draws what eager draws."""
    case = build("gpt2")
    eager = eager_twin(case)
    with pytest.raises(memplan.InfeasibleBudgetError) as info:
        memplan.optimize(case.model, 1, example_inputs=case.args, compile=True)
    plan = memplan.optimize(case.model, info.value.minimum_bytes, example_inputs=case.args,
                            compile=True)
    graph = plan._result().graph
    replayed = [name for name in plan.program.backward if graph[name].op == op_name(replay)]
    assert replayed, "no dropout mask was recomputed"
    assert_steps_match(plan.module, case, eager)


class BreaksGraph(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h)


def test_torch_compile_backend_refuses_a_graph_break():
    model = BreaksGraph()
    compiled = torch.compile(model, backend=memplan.backend(1.0))
    with pytest.raises(Exception, match=r"graph break[\s\S]*test_compile.py:\d+ in forward"):
        compiled(torch.randn(4, 8)).sum().backward()


def test_backward_compiles_with_memplans_inductor_options(monkeypatch):
    """aot_autograd compiles the backward at its first call, after ``optimize`` returned: the
    options must be set by the compiler itself (without, it ran with inductor's defaults, and
    on CUDA gave convolutions channels-last copies the plan does not know of)."""
    seen = []
    compile_in_segments = memplan.inductor.compile_in_segments

    def recording(*args, **kwargs):
        config = torch._inductor.config
        seen.append((config.fallback_random, config.loop_ordering_after_fusion))
        return compile_in_segments(*args, **kwargs)

    monkeypatch.setattr(memplan.inductor, "compile_in_segments", recording)
    case = build("mlp")
    plan = memplan.optimize(case.model, 1.0, example_inputs=case.args, compile=True)
    run_step(plan.module, case, 101)
    assert seen == [(True, False), (True, False)], f"forward, backward: {seen}"


def test_segments_return_the_strides_the_plan_traced(monkeypatch):
    """With planned strides (memplan's setting on CUDA) every segment returns its values with
    the strides of the planned graph, so that later ops, convolutions above all, get the layouts
    the plan measured them with; without it inductor returns 369 of DenseNet-40's values
    channels-last on this CPU. Inductor still gives this CPU's convolutions channels-last
    layouts inside a segment (its layout optimisation, off on CUDA), and mkldnn then rounds a
    convolution's input gradient differently on the mixed layouts (3.8e-3 of its norm in one
    segment at method none), so the gradients are held to 1% of their norm: a wrong layout or
    value is off by all of it."""
    from torch._guards import TracingContext

    changed = []
    compile_in_segments = memplan.inductor.compile_in_segments

    def checking(graph, inputs, compile_graph, ops_per_segment, **options):
        def compile_segment(segment, examples):
            traced = [v.meta["val"].stride() for v in segment.graph.output_node().args[0]]
            with TracingContext.report_output_strides() as strides:
                compiled = compile_graph(segment, examples)
            changed.extend((a, tuple(b)) for a, b in zip(traced, strides) if tuple(b) != a)
            TracingContext.get().output_strides.extend(strides)
            return compiled
        return compile_in_segments(graph, inputs, compile_segment, ops_per_segment,
                                   **{**options, "planned_strides": True})

    monkeypatch.setattr(memplan.inductor, "compile_in_segments", checking)
    case = build("densenet40")
    eager = eager_twin(case)
    plan = memplan.optimize(case.model, 1.0, example_inputs=case.args, method="log", compile=True)
    assert plan.program.recomputed
    assert not changed, f"{len(changed)} values returned with other strides: {changed[:3]}"
    _, grads, _ = run_step(plan.module, case, 101)
    _, eager_grads, _ = run_step(eager, case, 101)
    flat = torch.cat([grads[name].flatten() for name in eager_grads])
    eager_flat = torch.cat([g.flatten() for g in eager_grads.values()])
    assert_near(flat, eager_flat, "gradients", rtol=1e-2)
