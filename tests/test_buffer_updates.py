"""BatchNorm buffers are updated in place where nothing else reads them, and exactly as eager."""

import torch
from harness import assert_matches_eager, eager_twin, run_step
from zoo import build

import memplan

aten = torch.ops.aten


def forward_graph(plan):
    step, _ = next(iter(plan.module._steps.values()))
    return step.fx_compiled[0].graph


def batch_norms(graph) -> dict:
    return {target: len(graph.find_nodes(op="call_function", target=target))
            for target in (aten._native_batch_norm_legit.default,
                           aten._native_batch_norm_legit_functional.default)}


def test_every_batch_norm_of_a_densenet_writes_its_buffers_in_place():
    case = build("densenet40")
    eager = eager_twin(case)
    plan = memplan.optimize(case.model, "60%", example_inputs=case.args)
    graph = forward_graph(plan)
    assert batch_norms(graph) == {aten._native_batch_norm_legit.default: 39,
                                  aten._native_batch_norm_legit_functional.default: 0}
    buffers = [n for n in plan._result().graph.nodes if n.mutated]
    assert len(buffers) == 3 * 39
    returned = graph.output_node().args[0][:len(buffers)]
    assert [n.name for n in returned] == [n.name for n in buffers]  # each buffer is its own new value
    assert_matches_eager(plan, case, eager)


def test_a_shared_batch_norm_and_a_read_buffer_stay_functional():
    case = build("stateful_norms")
    eager = eager_twin(case)
    plan = memplan.optimize(case.model, "100%", example_inputs=case.args)
    assert batch_norms(forward_graph(plan)) == {aten._native_batch_norm_legit.default: 0,
                                                aten._native_batch_norm_legit_functional.default: 3}
    assert_matches_eager(plan, case, eager)


def test_a_batch_norm_recomputed_in_backward_leaves_the_running_statistics_alone():
    case = build("densenet40")
    eager = eager_twin(case)
    least = memplan.optimize(case.model, "100%", example_inputs=case.args).minimum_budget_bytes
    plan = memplan.optimize(case.model, least, example_inputs=case.args)
    assert_matches_eager(plan, case, eager)  # compiles the backward graph
    step, _ = next(iter(plan.module._steps.values()))
    backward = step.fx_compiled[1].graph
    assert backward.find_nodes(op="call_function", target=aten._native_batch_norm_legit.no_stats)
    assert not backward.find_nodes(op="call_function",
                                   target=aten._native_batch_norm_legit_functional.default)
    planned_out, planned_grads, _ = run_step(plan.module, case, seed=3)
    eager_out, eager_grads, _ = run_step(eager, case, seed=3)
    assert torch.equal(planned_out, eager_out)
    assert all(torch.equal(planned_grads[name], eager_grads[name]) for name in eager_grads)
