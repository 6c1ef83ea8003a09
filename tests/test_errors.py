"""The user-facing errors, and planning on first call: what goes wrong says what to do."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import memplan
import memplan.api
import memplan.cuda_graphs
from harness import eager_twin, run_step
from measure import measured_step_peak
from zoo import build


def mlp_case():
    return build("mlp")


def test_infeasible_budget_names_the_minimum_which_is_exact():
    case = mlp_case()
    with pytest.raises(memplan.InfeasibleBudgetError) as info:
        memplan.optimize(case.model, 1_000, example_inputs=case.args)
    minimum = info.value.minimum_bytes
    assert isinstance(minimum, int) and minimum > 1_000
    assert f"{minimum:,}" in str(info.value)
    with pytest.raises(memplan.InfeasibleBudgetError):
        memplan.optimize(case.model, minimum - 1, example_inputs=case.args)
    plan = memplan.optimize(case.model, minimum, example_inputs=case.args)
    assert plan.predicted_peak_bytes <= minimum
    assert measured_step_peak(plan.module, case.args) <= minimum


def test_infeasible_for_one_method_suggests_auto():
    case = mlp_case()
    with pytest.raises(memplan.InfeasibleBudgetError, match="method='auto'"):
        memplan.optimize(case.model, 1, example_inputs=case.args, method="none")


class DataDependentBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        y = self.linear(x)
        if y.sum() > 0:
            return y.relu()
        return y.tanh()


class ItemInBranch(DataDependentBranch):
    def forward(self, x):
        y = self.linear(x)
        return y * 2 if y.mean().item() > 0 else y


@pytest.mark.parametrize("model_type", [DataDependentBranch, ItemInBranch])
def test_untraceable_model_raises_capture_error_saying_what_to_do(model_type):
    with pytest.raises(memplan.CaptureError) as info:
        memplan.optimize(model_type(), "100%", example_inputs=(torch.randn(4, 8),))
    message = str(info.value)
    assert model_type.__name__ in message
    assert "data-dependent" in message and "traceable" in message


def test_model_without_gradients_raises_capture_error():
    model = nn.Linear(8, 8).requires_grad_(False)
    with pytest.raises(memplan.CaptureError, match="no backward"):
        memplan.optimize(model, "100%", example_inputs=(torch.randn(4, 8),))


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown method"):
        memplan.optimize(nn.Linear(8, 8), "100%", method="magic")


def test_cuda_graphs_are_refused_off_cuda():
    case = mlp_case()
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model and its inputs on a "
                                         "CUDA device, not cpu"):
        memplan.optimize(case.model, "100%", example_inputs=case.args, cuda_graphs=True)


def test_cuda_graphs_are_refused_for_memplans_dropout():
    """Its masks are drawn from a generator state read on the host: a graph would replay one."""
    case = mlp_case()
    plan = memplan.optimize(case.model, "100%", example_inputs=case.args)
    step, _out_spec = plan.module.prepare(case.args, {})
    with pytest.raises(ValueError, match="cannot replay MLP's dropout"):
        memplan.cuda_graphs.check_dropout(case.model, step)
    with pytest.raises(ValueError, match="cannot replay MLP's dropout"):
        memplan.cuda_graphs.graphed_step(case.model, step, list(case.args))


def test_cuda_graphs_refuse_to_accumulate_gradients():
    """A replay's gradients are the graphs' buffers, taken as .grad without a copy: a gradient
    left from the last step would be overwritten, then added to."""
    case = mlp_case()
    plan = memplan.optimize(case.model, "100%", example_inputs=case.args)
    plan.module(*case.args).sum().backward()
    plan.module.cuda_graphs = True
    with pytest.raises(ValueError, match="cannot be accumulated across steps: set them to None"):
        plan.module(*case.args)


def test_lazy_plan_is_made_at_first_call_and_again_per_shape(monkeypatch):
    captures = []
    real_capture = memplan.api.capture

    def counting_capture(model, args, kwargs, *rest, **options):
        captures.append(tuple(args[0].shape))
        return real_capture(model, args, kwargs, *rest, **options)

    monkeypatch.setattr(memplan.api, "capture", counting_capture)
    case = mlp_case()
    eager = eager_twin(case)
    plan = memplan.optimize(case.model, "100%")
    assert captures == []
    for read in ("predicted_peak_bytes", "budget_bytes", "method", "program"):
        with pytest.raises(RuntimeError, match="not been made yet.*example_inputs"):
            getattr(plan, read)

    planned_out, _, _ = run_step(plan.module, case, seed=3)
    eager_out, _, _ = run_step(eager, case, seed=3)
    torch.testing.assert_close(planned_out, eager_out, rtol=1e-5, atol=1e-6)
    assert captures == [(512, 64)]
    small_peak = plan.predicted_peak_bytes
    assert small_peak == plan.budget_bytes == plan.baseline_peak_bytes

    bigger = type(case)(case.model, (torch.randn(1024, 64),))
    run_step(plan.module, bigger, seed=4)
    assert captures == [(512, 64), (1024, 64)]
    assert plan.predicted_peak_bytes > small_peak

    run_step(plan.module, case, seed=5)  # a shape seen before: its plan is reused
    assert captures == [(512, 64), (1024, 64)]


def test_eval_mode_and_no_grad_call_the_model_itself():
    case = mlp_case()
    plan = memplan.optimize(case.model, "100%", example_inputs=case.args)
    plan.module.eval()
    assert not case.model.training
    torch.testing.assert_close(plan.module(*case.args), case.model(*case.args), rtol=0, atol=0)
    plan.module.train()
    with torch.no_grad():
        out = plan.module(*case.args)
    assert out.grad_fn is None
