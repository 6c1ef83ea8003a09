"""Replay a planned training step as two CUDA graphs, forward and backward.

A planned step launches thousands of small kernels; on a fast GPU the host's launches, not the
kernels, set its time (DenseNet-BC-100 compiled at its least budget on an H200: 16.8 ms of
kernels in 2,349 launches, in a step of about 64 ms; replayed as graphs, 18.3 ms:
bench/results/cuda_graphs_h200.md). The step's forward and its backward are captured once and
replayed, as ``torch.cuda.make_graphed_callables`` does for one callable. The capture allocates
in the planned order, from a pool of its own, and each replay reuses those allocations; the pool
stays reserved between steps. Outputs and gradients are the graphs' static buffers, overwritten
by the next step (``check_gradients_cleared``). The plan is made for the budget less what the
graphs hold beside it (``held_bytes``).

Capturing follows one warm-up step on the capture's own stream, which initialises cuDNN, cuBLAS
and the lazily compiled backward outside the graph. The warm-up's outputs and gradients are freed
before the capture (``make_graphed_callables`` keeps them alive through it: on an H200 that, and
the cuBLAS workspaces of a second stream, put the first capture 68-106 MiB over its plan). The
buffers the warm-up updated (BatchNorm's running statistics) and the random states it advanced
are restored after the capture, so that the first replay is the user's first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from memplan.graph import CUDA_ALLOCATOR_ROUNDING, Phase, allocated_bytes
from memplan.passes.dropout import draw

if TYPE_CHECKING:
    from memplan.capture import CapturedStep
    from memplan.graph import JointGraph


def held_bytes(model: torch.nn.Module, flat_inputs: list[Any], graph: JointGraph) -> int:
    """What the graphs hold beside the planned step: a static copy of each input and a static
    buffer for each output's gradient (the tangents), and, while capturing, a copy of the
    buffers. The cuBLAS workspaces of the capture's stream replace the default stream's, which
    the plan counted and the capture frees."""
    tensors = [t for t in flat_inputs if isinstance(t, torch.Tensor)] + list(model.buffers())
    tangents = [graph.storages[s].nbytes for node in graph.nodes_of(Phase.TANGENT)
                for s in node.storages]
    return sum(allocated_bytes(n, CUDA_ALLOCATOR_ROUNDING)
               for n in [t.nbytes for t in tensors] + tangents)


def check_gradients_cleared(model: torch.nn.Module, flat_inputs: list[Any]) -> None:
    """A replay writes the gradients into the graphs' buffers, which autograd then takes as
    ``.grad`` without a copy: a gradient still there would be overwritten, then added to."""
    inputs = [t for t in flat_inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if any(t.grad is not None for t in [*model.parameters(), *inputs]):
        raise ValueError("memplan: with cuda_graphs=True each step's gradients are the graphs' "
                         "buffers, which the next step overwrites, so gradients cannot be "
                         "accumulated across steps: set them to None before each step "
                         "(optimizer.zero_grad(), whose default does), or leave cuda_graphs off")


def check_inputs(flat_inputs: list[Any]) -> None:
    """Refuse, before planning, inputs that a replay could not take."""
    if not all(isinstance(t, torch.Tensor) for t in flat_inputs):
        raise ValueError("memplan: cuda_graphs=True needs the model's inputs to be tensors only; "
                         "pass other values as attributes of the model, or leave cuda_graphs off")


def check_dropout(model: torch.nn.Module, step: CapturedStep) -> None:
    """Refuse, right after planning, a step whose dropout a CUDA graph cannot replay."""
    if any(node.target is draw for node in step.fx_joint.graph.nodes):
        raise ValueError(f"memplan: cuda_graphs=True cannot replay {type(model).__name__}'s "
                         "dropout: memplan draws and replays dropout masks from the generator's "
                         "state, read on the host, which a CUDA graph does not capture. Leave "
                         "cuda_graphs off for this model, or set its dropout probabilities to 0")


def graphed_step(model: torch.nn.Module, step: CapturedStep,
                 flat_inputs: list[Any]) -> Callable[..., tuple]:
    """Capture ``step`` for inputs shaped as ``flat_inputs``; call the result with such inputs."""
    check_inputs(flat_inputs)
    check_dropout(model, step)
    static_inputs = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in flat_inputs)
    parameters = tuple(model.parameters())
    surface = static_inputs + parameters  # what a gradient may be returned for
    buffers = [(b, b.clone()) for b in model.buffers()]
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()
    stream = torch.cuda.Stream()
    forward_graph, backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle()
    torch.cuda.synchronize()
    # cuBLAS keeps a workspace per stream and thread, and a graph's kernels keep writing to the
    # one they were captured with. So the workspaces are dropped before the warm-up (the default
    # stream's, which the plan counted, would be held beside the graphs'), and before and after
    # the capture, as inductor's graph trees do: the graphs' own are allocated inside their
    # pool, which nothing else allocates from, and no later capture can free them.
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    try:
        with torch.cuda.stream(stream):
            warm_up = tuple(step.run(*static_inputs))
            _gradients(warm_up, surface,
                       [torch.empty_like(o) if o.requires_grad else None for o in warm_up])
            del warm_up
        torch.cuda.synchronize()
        torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()  # what the warm-up cached outside the graphs' pool
        with torch.cuda.graph(forward_graph, pool=pool, stream=stream):
            outputs = tuple(step.run(*static_inputs))
        grad_outputs = [torch.empty_like(o) if o.requires_grad else None for o in outputs]
        with torch.cuda.graph(backward_graph, pool=pool, stream=stream):
            gradients = _gradients(outputs, surface, grad_outputs)
        torch._C._cuda_clearCublasWorkspaces()
        # Let the capture's autograd graph go: its parameters' gradient accumulators were made
        # on the capture's stream, and autograd would synchronise the replays' backward with it.
        outputs = tuple(o.detach() for o in outputs)
    finally:
        for buffer, value in buffers:
            buffer.copy_(value)
        torch.set_rng_state(cpu_rng)
        torch.cuda.set_rng_state(cuda_rng)

    return replaying(Captured(forward_graph, backward_graph, static_inputs, outputs, grad_outputs,
                              gradients), parameters)


@dataclass(frozen=True)
class Captured:
    """Two captured graphs and the static tensors they read and write."""

    forward_graph: Any  # anything with replay(): a torch.cuda.CUDAGraph
    backward_graph: Any
    static_inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]
    grad_outputs: list[torch.Tensor | None]  # None for an output that needs no gradient
    gradients: list[torch.Tensor | None]  # one per input, then per parameter


def replaying(captured: Captured, parameters: tuple[torch.Tensor, ...]) -> Callable[..., tuple]:
    """The step as an autograd function that replays ``captured``: inputs and output gradients
    are copied into the static buffers, outputs and gradients are the graphs' own. A backward
    after a later forward is refused: that forward's replay overwrote what it reads."""
    forwards = [0]

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *given: torch.Tensor) -> tuple[torch.Tensor, ...]:
            for static, tensor in zip(captured.static_inputs, given):
                if static.data_ptr() != tensor.data_ptr():
                    static.copy_(tensor)
            captured.forward_graph.replay()
            forwards[0] += 1
            ctx.forward = forwards[0]
            returned = tuple(o.detach() for o in captured.outputs)
            ctx.mark_non_differentiable(
                *(r for r, g in zip(returned, captured.grad_outputs) if g is None))
            return returned

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            if ctx.forward != forwards[0]:
                raise RuntimeError("memplan: with cuda_graphs=True a step's backward must come "
                                   "before the next forward, whose replay overwrites the values "
                                   "it saved for backward; call backward first, or leave "
                                   "cuda_graphs off")
            for static, grad in zip(captured.grad_outputs, grads):
                if static is not None and grad is not None and static.data_ptr() != grad.data_ptr():
                    static.copy_(grad)
            captured.backward_graph.replay()
            return tuple(None if g is None else g.detach() for g in captured.gradients)

    return lambda *flat: Replay.apply(*flat, *parameters)


def _gradients(outputs: Sequence[torch.Tensor], surface: Sequence[torch.Tensor],
               grad_outputs: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The gradient for each tensor of ``surface`` (None where it needs none or gets none)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    wanted = [t for t in surface if t.requires_grad]
    found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                     allow_unused=True) if pairs and wanted else ())
    return [next(found, None) if t.requires_grad else None for t in surface]
