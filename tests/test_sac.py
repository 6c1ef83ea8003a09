"""plan.sac_policy(): torch.utils.checkpoint with the plan's saved set, exact against eager."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

import memplan
from harness import float_leaves, run_step
from memplan.passes.dropout import replay
from memplan.sac import op_name, saved_ops, unsaveable_ops
from zoo import build


class Checkpointed(torch.nn.Module):
    """The model under non-reentrant checkpointing with a fresh plan policy per call."""

    def __init__(self, model: torch.nn.Module, plan: memplan.Plan):
        super().__init__()
        self.model = model
        self.policies = []

        def context():
            self.policies.append(plan.sac_policy())
            return create_selective_checkpoint_contexts(self.policies[-1])

        self.context = context

    def forward(self, *args, **kwargs):
        return checkpoint(self.model, *args, use_reentrant=False, context_fn=self.context, **kwargs)


def planned_checkpoint(name: str, budget: str):
    case = build(name)
    eager = copy.deepcopy(case.model)
    plan = memplan.optimize(case.model, budget, example_inputs=case.args, example_kwargs=case.kwargs)
    return case, eager, plan, Checkpointed(copy.deepcopy(eager), plan)


def assert_step_equal(checkpointed, eager, case) -> None:
    out, grads, rng = run_step(checkpointed, case, seed=7)
    eager_out, eager_grads, eager_rng = run_step(eager, case, seed=7)
    for a, b in zip(float_leaves(out), float_leaves(eager_out)):
        assert torch.equal(a, b)
    for name, grad in eager_grads.items():
        assert torch.equal(grads[f"model.{name}"], grad), name
    assert torch.equal(rng, eager_rng)


def test_gpt2_policy_saves_what_the_plan_saves_and_steps_exactly():
    case, eager, plan, checkpointed = planned_checkpoint("gpt2", "50%")
    result = plan._result()
    expected = saved_ops(result.graph, result.chosen.program)
    assert plan.method != "none" and len(expected) > 5
    assert not unsaveable_ops(result.graph, result.chosen.program)
    assert_step_equal(checkpointed, eager, case)
    # CPU dropout draws its mask in place (bernoulli_), and eager has no op for the graph's
    # mask-times-input output: both are recomputed, with the RNG replayed.
    drawn_in_place = {n for n in expected if result.graph[n].op in (
        op_name(replay), "aten.native_dropout_backward.default")}
    assert drawn_in_place
    assert set(checkpointed.policies[0].kept) == expected - drawn_in_place
    for a, b in zip(checkpointed.model.buffers(), eager.buffers()):
        assert torch.equal(a, b)


def test_in_place_writes_after_batchnorm_are_recomputed_and_named():
    """DenseNet's relu_ overwrites BatchNorm outputs: neither can be cached, and the policy says
    that recomputing a BatchNorm updates its running statistics again."""
    case, eager, plan, checkpointed = planned_checkpoint("densenet40", "50%")
    result = plan._result()
    expected = saved_ops(result.graph, result.chosen.program)
    unsaveable = unsaveable_ops(result.graph, result.chosen.program)
    families = {result.graph[n].op for n in unsaveable}
    assert families == {"aten._native_batch_norm_legit_functional.default", "aten.relu.default"}
    with pytest.warns(UserWarning, match="running statistics again"):
        assert_step_equal(checkpointed, eager, case)
    policy = checkpointed.policies[0]
    assert set(policy.kept) == expected
    assert unsaveable <= set(policy.matched)
