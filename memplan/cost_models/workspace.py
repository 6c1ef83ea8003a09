"""Scratch memory an op takes on the GPU beyond its outputs, measured once per distinct call.

CUDA kernels allocate scratch through the caching allocator for the duration of the call: cuDNN
convolutions their workspaces, ``_softmax_backward_data`` a temporary as large as its gradient
(``grad * output``). It counts in ``max_memory_allocated`` and can set the step's peak. Each
distinct call (op, shapes, strides, dtypes, arguments) runs once on the real device with random
inputs, and its workspace is the peak it reached beyond its inputs and new outputs. Random ops
are left out (running one would advance the generator eager draws from), and so are views and
dropout replays (they set the generator from their argument).

In a graph inductor compiles, so are the ops it lowers to kernels of its own
(``_generated_by_inductor``): those take at most small buffers, where the ATen kernels, run as
they are, can take much. On an H200 VGG19's low-memory max-pooling prims measured 2.6 GiB and
set its least compiled budget at 4.9 GiB instead of 3.5; a BatchNorm's ``var_mean`` over a
channels-last ResNet-50 activation measured 528 MiB and put its least-budget plan's prediction
22% above its measured peak. A few such lowerings still call ATen for some arguments, as sort
does over a long dimension; their scratch memory is then not counted.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from memplan.passes.dropout import sets_generator_state


def real_argument(value: Any, device: torch.device) -> Any:
    """A real tensor like the fake one, strides included: a non-contiguous argument makes
    cuDNN copy it, and that copy is part of the op's scratch memory. Expanded (stride 0)
    tensors are views of a smaller random base, as they were in the graph."""
    if not isinstance(value, torch.Tensor):
        return value
    extent = 1 + sum((n - 1) * s for n, s in zip(value.shape, value.stride())) if value.numel() else 0
    base = torch.empty(extent, dtype=value.dtype, device=device)
    base = base.normal_() if value.is_floating_point() else base.zero_()
    return base.as_strided(value.shape, value.stride())


def call_key(node: fx.Node) -> str:
    def describe(v: Any) -> Any:
        if isinstance(v, fx.Node):
            val = v.meta.get("val")
            return (tuple(val.shape), val.dtype, tuple(val.stride())) if isinstance(val, torch.Tensor) else None
        return v
    return repr((node.target, pytree.tree_map(describe, (node.args, node.kwargs))))


def _generated_by_inductor(op: torch._ops.OpOverload) -> bool:
    """Whether inductor generates the kernel of ``op`` rather than calling a library's (ATen's
    fallbacks, cuDNN's convolutions, cuBLAS's products, its ``kernel`` package's templates)."""
    from torch._inductor import lowering
    lowered = lowering.lowerings.get(op)
    return (lowered is not None and op not in lowering.fallbacks
            and not getattr(lowered, "__module__", "").startswith("torch._inductor.kernel"))


def _measured(node: fx.Node, compiled: bool = False) -> bool:
    """A deterministic, non-view ATen op that returns tensors, and that runs as it is."""
    op = node.target
    return (isinstance(op, torch._ops.OpOverload) and not op.is_view
            and not (compiled and _generated_by_inductor(op))
            and torch.Tag.nondeterministic_seeded not in op.tags and not sets_generator_state(op)
            and any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(node.meta.get("val"))))


def call_workspace(op: Any, args: Any, kwargs: Any, device: torch.device) -> int:
    """The bytes one call of ``op`` reaches beyond what it leaves allocated: its new outputs, and
    what a library keeps from its first call in the process on (cuBLASLt's workspace, which the
    ambient memory counts). Counted here too, it made a process's first plan differ from the
    same plan made again."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = op(*args, **kwargs)
    torch.cuda.synchronize(device)
    left_allocated = torch.cuda.memory_allocated(device)
    del out
    return max(0, torch.cuda.max_memory_allocated(device) - left_allocated)


def measure_workspaces(joint: fx.GraphModule, device: torch.device, *,
                       compiled: bool = False) -> dict[str, int]:
    """Workspace bytes per node name, for the ops of the joint graph on ``device``; ``compiled``:
    inductor runs the graph."""
    if device.type != "cuda":
        return {}
    by_key: dict[str, int] = {}
    result: dict[str, int] = {}
    for node in joint.graph.nodes:
        if node.op != "call_function" or not _measured(node, compiled):
            continue
        key = call_key(node)
        if key not in by_key:
            args, kwargs = pytree.tree_map_only(
                fx.Node, lambda n: real_argument(n.meta.get("val"), device), (node.args, node.kwargs))
            by_key[key] = call_workspace(node.target, args, kwargs, device)
            del args, kwargs
        result[node.name] = by_key[key]
    return result
