"""Compile the planned graphs with inductor.

aot_autograd traces with inductor's decompositions and calls memplan's partition function; the
forward and backward graphs it returns go to inductor's graph compiler. Inductor fuses and
reorders within each graph, so the measured peak is not the eager prediction: lower where it
fuses temporaries away, higher where it moves the planned recomputations
(bench/results/compiled_peak_h200.md).
Dropout uses PyTorch's own generator (``fallback_random``), so masks equal eager's. Loop
reordering after fusion is off: on torch 2.11 it asserts in the scheduler on planned DenseNet
backward graphs (``reorder_loops_by_dep_pair``).

Inductor may give a saved value another layout than eager's (channels-last after convolutions);
aot_autograd compiles the backward for the strides the compiled forward reports, but only
through a ``TracingContext``. Dynamo provides one to ``memplan.backend``; ``optimize`` has none,
so one is made here.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._functorch.aot_autograd import aot_module_simplified
from torch._guards import TracingContext, detect_fake_mode, tracing
from torch._subclasses.fake_tensor import FakeTensorMode


def compile_with_inductor(gm: fx.GraphModule, example_inputs: Sequence[Any],
                          partition: Callable[..., Any]) -> Callable[..., Any]:
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table

    options = {"fallback_random": True, "loop_ordering_after_fusion": False}

    def forward(graph: fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
        with torch._inductor.config.patch(options):
            return compile_fx_inner(graph, inputs)

    def backward(graph: fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
        with torch._inductor.config.patch(options):
            return compile_fx_inner(graph, inputs, is_backward=True)

    context = contextlib.nullcontext()
    if TracingContext.try_get() is None:
        fake_mode = detect_fake_mode(example_inputs) or FakeTensorMode(allow_non_fake_inputs=True)
        context = tracing(TracingContext(fake_mode))
    with context, torch._inductor.config.patch(options):
        return aot_module_simplified(gm, list(example_inputs), fw_compiler=forward,
                                     bw_compiler=backward, partition_fn=partition,
                                     decompositions=select_decomp_table())
