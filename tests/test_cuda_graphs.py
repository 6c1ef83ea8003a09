"""What CUDA graphs hold beside a plan, the gradients their backward returns, and how a
replayed step behaves under autograd.

Capturing needs a GPU (``bench/gpu.py --cuda-graphs`` measures it); these parts do not: the
replay is checked with stand-ins for the captured graphs.
"""

import pytest
import torch
from zoo import build

import memplan
from memplan.cuda_graphs import Captured, _gradients, held_bytes, replaying
from memplan.graph import CUDA_ALLOCATOR_ROUNDING, allocated_bytes


def test_cuda_graphs_hold_static_inputs_output_gradients_and_buffer_copies():
    """The capture copies the inputs and, while capturing, the buffers; the backward graph reads
    each output's gradient from a static buffer of the output's size."""
    case = build("densenet40")
    plan = memplan.optimize(case.model, "100%", example_inputs=case.args, method="none")
    outputs = case.model(*case.args)
    sizes = [t.nbytes for t in (*case.args, *case.model.buffers(), outputs)]
    assert held_bytes(case.model, list(case.args), plan._result().graph) == sum(
        allocated_bytes(n, CUDA_ALLOCATOR_ROUNDING) for n in sizes)


def test_the_backward_returns_a_gradient_in_each_slot_that_needs_one():
    """Slots of tensors that need no gradient, or that the outputs do not use, get None."""
    x = torch.randn(3, requires_grad=True)
    constant = torch.randn(3)
    unused = torch.randn(3, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    outputs = ((x * w).sum(), torch.arange(3))  # the second needs no gradient
    grad_outputs = [torch.tensor(2.0), None]
    gradients = _gradients(outputs, (x, constant, unused, w), grad_outputs)
    assert [g is None for g in gradients] == [False, True, True, False]
    torch.testing.assert_close(gradients[0], 2 * w.detach())
    torch.testing.assert_close(gradients[3], 2 * x.detach())


class Replayed:
    """Stands in for a captured CUDA graph: replay() runs ``run``, writing static buffers."""

    def __init__(self, run):
        self.replay = run


def replayed_linear_step():
    """out = x @ w written into a static buffer, beside a float count that needs no gradient; the
    backward writes w's gradient into another."""
    w = torch.randn(4, requires_grad=True)
    x, out, count = torch.empty(3, 4), torch.empty(3), torch.zeros(())
    grad_out, grad_w = torch.empty(3), torch.empty(4)

    def forward():
        out.copy_(x @ w.detach())
        count.add_(1)

    captured = Captured(Replayed(forward), Replayed(lambda: grad_w.copy_(grad_out @ x)), (x,),
                        (out, count), [grad_out, None], [None, grad_w])
    return replaying(captured, (w,)), w


def test_a_replayed_step_returns_outputs_and_gradients_as_the_plain_step_does():
    step, w = replayed_linear_step()
    x = torch.randn(3, 4)
    out, count = step(x)
    torch.testing.assert_close(out, x @ w.detach())
    assert out.requires_grad and not count.requires_grad  # as the plain step returns a count
    (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([1.0, 2.0, 3.0]) @ x)


def test_a_backward_after_the_next_forward_is_refused():
    """The next forward's replay overwrote what the earlier step saved for its backward."""
    step, _w = replayed_linear_step()
    first, _ = step(torch.randn(3, 4))
    second, _ = step(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="backward must come before the next forward"):
        first.sum().backward()
    second.sum().backward()
