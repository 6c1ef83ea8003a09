"""One harness for every planned module: outputs, gradients, RNG, buffers and memory vs eager.

The reference is an eager deepcopy of the model taken before planning, run under the same seed
before every forward, so dropout draws the same masks when the planned step draws them in the
same order. Nothing here imports memplan's internals: the checks read only the public ``Plan``.
"""

from __future__ import annotations

import copy

import torch
import torch.utils._pytree as pytree
from torch.testing import assert_close

from measure import measured_step_peak
from zoo import Case

RTOL, ATOL = 1e-5, 1e-6  # for telling two seeds' outputs apart
PEAK_TOLERANCE = 0.03
LEARNING_RATE = 0.1


def float_leaves(value) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]


def loss_of(outputs) -> torch.Tensor:
    """A weighted sum of every differentiable output, the weights fixed and uneven."""
    generator = torch.Generator().manual_seed(1234)
    return sum((t * torch.randn(t.shape, generator=generator)).sum() for t in float_leaves(outputs))


def run_step(module: torch.nn.Module, case: Case, seed: int):
    """One forward + backward under ``seed``; returns outputs, gradients and the RNG state after."""
    for p in module.parameters():
        p.grad = None
    torch.manual_seed(seed)
    outputs = module(*case.args, **case.kwargs)
    loss_of(outputs).backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    return outputs, grads, torch.get_rng_state()


@torch.no_grad()
def sgd_step(module: torch.nn.Module) -> None:
    for p in module.parameters():
        if p.grad is not None:
            p.add_(p.grad, alpha=-LEARNING_RATE)


def eager_twin(case: Case) -> torch.nn.Module:
    """The reference: taken before planning touches the model."""
    return copy.deepcopy(case.model)


def assert_shares_parameters(plan, model: torch.nn.Module) -> None:
    planned = dict(plan.module.named_parameters())
    original = dict(model.named_parameters())
    assert planned.keys() == original.keys()
    assert all(planned[name] is original[name] for name in original)
    assert list(plan.module.state_dict().keys()) == list(model.state_dict().keys())


def assert_matches_eager(plan, case: Case, eager: torch.nn.Module, steps: int = 2) -> None:
    """Two training steps: outputs, every gradient, RNG use and buffers bitwise as eager's.

    On the CPU the planned graphs run eager's kernels on the same values, recomputations too,
    so nothing but a wrong value or a different kernel can make them differ."""
    for step in range(steps):
        seed = 100 + step
        planned_out, planned_grads, planned_rng = run_step(plan.module, case, seed)
        eager_out, eager_grads, eager_rng = run_step(eager, case, seed)
        assert_close(planned_out, eager_out, rtol=0, atol=0)
        assert planned_grads.keys() == eager_grads.keys()
        for name in eager_grads:
            assert_close(planned_grads[name], eager_grads[name], rtol=0, atol=0,
                         msg=lambda m, name=name: f"gradient of {name}: {m}")
        # Same draws from the generator, in the same number: dropout masks are eager's.
        assert torch.equal(planned_rng, eager_rng), f"step {step}: RNG state differs from eager"
        sgd_step(plan.module)
        sgd_step(eager)
    planned_buffers = dict(case.model.named_buffers())
    for name, buffer in eager.named_buffers():
        assert torch.equal(planned_buffers[name], buffer), f"buffer {name} differs from eager"


def assert_randomness_matters(case: Case) -> None:
    """For dropout models: another seed gives other outputs, so equal outputs mean equal masks."""
    eager = copy.deepcopy(case.model)  # a copy: training forwards update BatchNorm statistics
    torch.manual_seed(7)
    a = float_leaves(eager(*case.args, **case.kwargs))[0]
    torch.manual_seed(8)
    b = float_leaves(eager(*case.args, **case.kwargs))[0]
    assert not torch.allclose(a, b, rtol=RTOL, atol=ATOL)


def assert_measured_peak(plan, case: Case) -> int:
    """MemTracker's peak, less the loss's own bytes, fits the budget; it is within 3% of the
    predicted peak."""
    measured = measured_step_peak(plan.module, case.args, case.kwargs)
    predicted = plan.predicted_peak_bytes
    assert measured <= plan.budget_bytes, (
        f"measured {measured:,} B over the budget {plan.budget_bytes:,} B (predicted {predicted:,})")
    assert abs(measured - predicted) <= PEAK_TOLERANCE * predicted, (
        f"measured {measured:,} B vs predicted {predicted:,} B")
    return measured
