"""Compile the planned graphs with inductor: memplan's partition replaces inductor's.

Inductor runs its joint-graph passes, then calls the partitioner named by
``torch._inductor.config.custom_partitioner_fn``; memplan's plans the step there, and inductor
compiles the forward and backward graphs it returns. Inductor fuses and reorders within each
graph, so the measured peak may be lower than the eager prediction, never the saved set larger.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx


def _partitioner(partition: Callable[..., Any]):
    from torch._inductor.custom_graph_pass import CustomPartitionerFn

    class MemplanPartitioner(CustomPartitionerFn):
        def __call__(self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any):
            kwargs.pop("compiler", None)
            return partition(gm, joint_inputs, **kwargs)

        def uuid(self) -> None:  # every plan is its own: never reuse a cached compilation
            return None

    return MemplanPartitioner()


def compile_with_inductor(gm: fx.GraphModule, example_inputs: Sequence[Any],
                          partition: Callable[..., Any]) -> Callable[..., Any]:
    from torch._inductor.compile_fx import compile_fx

    if not hasattr(torch._inductor.config, "custom_partitioner_fn"):
        raise RuntimeError(
            f"torch {torch.__version__} has no torch._inductor.config.custom_partitioner_fn, which "
            "memplan's compiled path needs; use memplan.optimize(..., compile=False)")
    # fallback_random: dropout draws from PyTorch's generator, so masks equal eager's.
    with torch._inductor.config.patch(custom_partitioner_fn=_partitioner(partition),
                                      fx_graph_cache=False, fallback_random=True):
        return compile_fx(gm, list(example_inputs))
