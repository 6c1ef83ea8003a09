"""What CUDA graphs hold beside a plan, and the gradients their backward returns.

Capturing needs a GPU (``bench/gpu.py --cuda-graphs`` measures it); these parts do not.
"""

import torch
from zoo import build

import memplan
from memplan.cuda_graphs import _gradients, held_bytes
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
