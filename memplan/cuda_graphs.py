"""Replay a planned training step as two CUDA graphs, forward and backward.

A planned step launches thousands of small kernels; on a fast GPU the host's launches, not the
kernels, set its time (DenseNet-BC-100 compiled at its least budget on an H200: 16.8 ms of
kernels in 2,349 launches, in a step of about 64 ms; replayed as graphs, 18.3 ms:
bench/results/cuda_graphs_h200.md). ``torch.cuda.make_graphed_callables`` captures the step's
forward and its backward once and replays them. The capture allocates in the planned order,
from a pool of its own, and each replay reuses those allocations; the pool stays reserved
between steps. Outputs and gradients are the graphs' static buffers, overwritten by the next
step (``check_gradients_cleared``). The plan is made for the budget less what the graphs hold
beside it (``held_bytes``).

Capturing follows one warm-up step on the capture's stream, which initialises cuDNN, cuBLAS and
the lazily compiled backward outside the graph; the buffers it updated (BatchNorm's running
statistics) and the random states it advanced are restored after the capture, so that the first
replay is the user's first step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from memplan.passes.dropout import draw

if TYPE_CHECKING:
    from memplan.capture import CapturedStep


class _Step(torch.nn.Module):
    """The planned step as a module whose parameters are the model's, for the capture to
    return their gradients."""

    def __init__(self, model: torch.nn.Module, run: Callable[..., Any]):
        super().__init__()
        self._modules = model._modules
        self._parameters = model._parameters
        object.__setattr__(self, "_run", run)

    def forward(self, *flat: torch.Tensor) -> tuple:
        return tuple(self._run(*flat))


def held_bytes(flat_inputs: list[Any]) -> int:
    """What the graphs hold beside the planned step: a static copy of each input, and the
    cuBLAS workspaces of the graphs' stream, for the forward's thread and autograd's backward
    thread, beside those of the stream the plan measured (on an H200 the first graphed step of
    a process peaked 69-72 MiB above the same plan run plainly: 2 x 33 MiB, and the copies)."""
    inputs = sum(t.nbytes for t in flat_inputs if isinstance(t, torch.Tensor))
    return inputs + 2 * _blas_workspace_bytes()


def check_gradients_cleared(model: torch.nn.Module) -> None:
    """A replay writes the gradients into the graphs' buffers, which autograd then takes as
    ``.grad`` without a copy: a gradient still there would be overwritten, then added to."""
    if any(p.grad is not None for p in model.parameters()):
        raise ValueError("memplan: with cuda_graphs=True each step's gradients are the graphs' "
                         "buffers, which the next step overwrites, so gradients cannot be "
                         "accumulated across steps: set them to None before each step "
                         "(optimizer.zero_grad(), whose default does), or leave cuda_graphs off")


def _blas_workspace_bytes() -> int:
    """One thread's cuBLAS and cuBLASLt workspaces on one stream."""
    sizes = ("_cuda_getCublasWorkspaceSize", "_cuda_getCublasLtWorkspaceSize")
    return sum(getattr(torch._C, name, lambda: 0)() for name in sizes)


def graphed_step(model: torch.nn.Module, step: CapturedStep,
                 flat_inputs: list[Any]) -> Callable[..., tuple]:
    """Capture ``step`` for inputs shaped as ``flat_inputs``; call the result with such inputs."""
    if not all(isinstance(t, torch.Tensor) for t in flat_inputs):
        raise ValueError("memplan: cuda_graphs=True needs the model's inputs to be tensors only; "
                         "pass other values as attributes of the model, or leave cuda_graphs off")
    if any(node.target is draw for node in step.fx_joint.graph.nodes):
        raise ValueError(f"memplan: cuda_graphs=True cannot replay {type(model).__name__}'s "
                         "dropout: memplan draws and replays dropout masks from the generator's "
                         "state, read on the host, which a CUDA graph does not capture. Leave "
                         "cuda_graphs off for this model, or set its dropout probabilities to 0")
    static_inputs = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in flat_inputs)
    buffers = [(b, b.clone()) for b in model.buffers()]
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()
    torch.cuda.synchronize()
    # cuBLAS keeps a workspace per stream it ran on; the warm-up makes those of the capture's
    # stream, and the other streams' would be held beside them (inductor's graph trees too
    # clear them before recording).
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    try:
        graphed = torch.cuda.make_graphed_callables(_Step(model, step.run), static_inputs,
                                                    num_warmup_iters=1, allow_unused_input=True)
    finally:
        torch.cuda.empty_cache()  # what the warm-up cached outside the graphs' pool
        for buffer, value in buffers:
            buffer.copy_(value)
        torch.set_rng_state(cpu_rng)
        torch.cuda.set_rng_state(cuda_rng)
    return graphed
