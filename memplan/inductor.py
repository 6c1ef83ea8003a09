"""Compile the planned graphs with inductor, in segments that keep the planned lifetimes.

aot_autograd traces with inductor's decompositions and calls memplan's partition function; the
forward and backward graphs it returns go to inductor's graph compiler. Given a whole graph,
inductor computes a pointwise value inside the kernel of a later consumer and keeps what that
value reads alive until then: on DenseNet-BC-100 the backward of the least-budget plan peaked
411 MiB above the planned order (bench/results/compiled_peak_h200.md). So each graph is cut
into consecutive segments of ``OPS_PER_SEGMENT`` ops, compiled one by one: inductor fuses within
a segment, and every value that crosses a boundary is materialised there and freed after the
last segment that reads it, as the plan has it. Within a segment inductor may still hold a
value longer than planned. Two ways it did so on DenseNet-BC-100 (H200) are closed on CUDA. A
value whose computation frees a much larger storage is returned by its segment, so that
inductor computes it in order (``_values_that_free_storage``). Inductor's layout optimisation is
off: it gave convolutions channels-last inputs, copying a concatenation while the original was
still alive, a copy the plan does not know of. Together they took the least-budget plan from
14.5% to 4.2% over its prediction, still over its budget (bench/results/segment_peaks_h200.md).
On the CPU they raised DenseNet-40's least-budget compiled peak instead (76.0 MB with neither,
80.8 with the layout optimisation off, 83.5 with both), so there both are left to inductor.

Buffer updates (BatchNorm's running statistics) stay in the compiled forward as writes into the
buffers, as torch.compile keeps them, rather than being copied back by aot_autograd's runtime,
a Python call per buffer per step; each write is moved next to the value it writes, so that it
is part of that value's segment. Dropout is drawn and replayed by memplan's own ops
(``memplan.passes.dropout``), which inductor calls as they are; other random ops use PyTorch's
generator too (``fallback_random``), so random values equal eager's. Loop reordering after
fusion is off: on torch 2.11 it asserts in the scheduler on planned DenseNet backward graphs
(``reorder_loops_by_dep_pair``).

Inductor may give a value other strides than eager's; each segment is compiled for the strides
the earlier ones report, and aot_autograd compiles the backward for the strides the forward
reports, through a ``TracingContext``. Dynamo provides one to ``memplan.backend``; ``optimize``
has none, so one is made here.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch._functorch.aot_autograd import aot_module_simplified
from torch._guards import TracingContext, detect_fake_mode, tracing
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

from memplan.errors import InternalError

# Measured on DenseNet-BC-100 at its least budget (H200): 50 ops per segment kept the compiled
# peak within 1.2% of the prediction, 150 went 4.6% over it, one segment 124% over it
# (bench/results/compiled_segments_h200.md).
OPS_PER_SEGMENT = 50
# Inductor options on CUDA only; the module docstring says why.
CUDA_OPTIONS = {"layout_optimization": False}


def compile_with_inductor(gm: fx.GraphModule, example_inputs: Sequence[Any],
                          partition: Callable[..., Any]) -> Callable[..., Any]:
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table

    on_cuda = any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in example_inputs)
    options = {"fallback_random": True, "loop_ordering_after_fusion": False}
    if on_cuda:
        options.update(CUDA_OPTIONS)

    def forward(graph: fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
        return compile_in_segments(graph, inputs, compile_fx_inner, OPS_PER_SEGMENT,
                                   return_values_that_free_storage=on_cuda)

    def backward(graph: fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
        return compile_in_segments(graph, inputs,
                                   lambda g, i: compile_fx_inner(g, i, is_backward=True),
                                   OPS_PER_SEGMENT, return_values_that_free_storage=on_cuda)

    context = contextlib.nullcontext()
    if TracingContext.try_get() is None:
        fake_mode = detect_fake_mode(example_inputs) or FakeTensorMode(allow_non_fake_inputs=True)
        context = tracing(TracingContext(fake_mode))
    with context, torch._inductor.config.patch(options):
        return aot_module_simplified(gm, list(example_inputs), fw_compiler=forward,
                                     bw_compiler=backward, partition_fn=partition,
                                     decompositions=select_decomp_table(),
                                     keep_inference_input_mutations=True)


@dataclass
class _Segment:
    run: Callable[[list], Any]  # boxed: empties its argument list
    inputs: list[fx.Node]
    last_reads: list[bool]  # per input: no later segment reads it
    outputs: list[fx.Node]


def compile_in_segments(graph: fx.GraphModule, example_inputs: Sequence[Any],
                        compile_graph: Callable[..., Any],
                        ops_per_segment: int, *,
                        return_values_that_free_storage: bool = False) -> Callable[[list], Any]:
    """Compile ``graph`` as consecutive segments and return one boxed callable that runs them.

    A multi-output op stays in one segment with its ``getitem`` users, so that segments pass
    tensors only. The strides each compiled segment reports for its outputs are the example
    inputs of the next, and are reported in turn for the graph's outputs. With
    ``return_values_that_free_storage``, a segment also returns the values of
    ``_values_that_free_storage`` it computes, and the runner drops them.
    """
    _move_input_writes_to_their_values(graph.graph)
    placeholders = list(graph.graph.find_nodes(op="placeholder"))
    returned = graph.graph.output_node().args[0]
    segment_of: dict[fx.Node, int] = {}  # in graph order
    counted = 0
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target is operator.getitem:
            segment_of[node] = segment_of[node.args[0]]
        elif _writes_input(node) and node.prev in segment_of:  # placed after what it must follow
            segment_of[node] = segment_of[node.prev]
        elif node.op == "call_function":
            segment_of[node] = counted // ops_per_segment
            counted += 1
        elif node.op not in ("placeholder", "get_attr", "output"):
            raise InternalError(f"aot_autograd gave inductor a graph with a {node.op} node "
                                f"({node.name}); memplan compiles placeholders, constants and "
                                "calls of functions only")
    count = counted and (counted - 1) // ops_per_segment + 1
    last_read: dict[fx.Node, int] = {}
    for node, segment in segment_of.items():
        for value in node.all_input_nodes:
            last_read[value] = segment
    for value in graph.graph.output_node().all_input_nodes:
        last_read[value] = count
    constants = {node: operator.attrgetter(node.target)(graph)  # returned as they are
                 for node in graph.graph.find_nodes(op="get_attr") if last_read.get(node) == count}

    frees_storage = (_values_that_free_storage(graph.graph) if return_values_that_free_storage
                     else set())
    example = dict(zip(placeholders, example_inputs))
    stride = {node: _stride(value) for node, value in example.items()}
    members_of: list[list[fx.Node]] = [[] for _ in range(count)]
    for node, segment in segment_of.items():
        members_of[segment].append(node)
    segments = []
    for k, members in enumerate(members_of):
        sub, env, inputs = fx.Graph(), {}, []
        for node in members:
            for value in node.all_input_nodes:
                if value not in env and value.op == "get_attr":  # a constant: each segment has it
                    env[value] = sub.node_copy(value)
                elif value not in env:
                    env[value] = sub.placeholder(value.name)
                    env[value].meta = dict(value.meta)
                    inputs.append(value)
            env[node] = sub.node_copy(node, env.__getitem__)
        outputs = [node for node in members if last_read.get(node, -1) > k]
        realized = [node for node in members if node not in outputs and node in frees_storage]
        sub.output(tuple(env[node] for node in outputs + realized))
        examples = [example[value] if value in example else
                    _restrided(value.meta.get("val"), stride[value]) for value in inputs]
        with TracingContext.report_output_strides() as strides, _no_donated_buffers():
            run = compile_graph(fx.GraphModule(graph, sub), examples)
        stride.update(zip(outputs, strides or [None] * len(outputs)))
        segments.append(_Segment(run, inputs, [last_read[v] == k for v in inputs], outputs))
    context = TracingContext.try_get()
    if context is not None and context.output_strides is not None:
        context.output_strides.extend(stride.get(v) if isinstance(v, fx.Node) else None
                                      for v in returned)

    def run_segments(args: list) -> list:
        values = {node: arg for node, arg in zip(placeholders, args) if node in last_read}
        values.update(constants)
        args.clear()  # the segments free what they read last
        for segment in segments:
            inputs = [values.pop(v) if last else values[v]
                      for v, last in zip(segment.inputs, segment.last_reads)]
            values.update(zip(segment.outputs, segment.run(inputs)))
        return [values[v] if isinstance(v, fx.Node) else v for v in returned]

    run_segments._boxed_call = True
    return run_segments


def _move_input_writes_to_their_values(graph: fx.Graph) -> None:
    """Place each write into an input (a buffer update, which aot_autograd leaves at the end of
    the forward) just after the value it writes and the input's last reader. The write then
    lands in the segment that computes the value, where inductor fuses it into that kernel,
    instead of carrying the value to the last segment and writing it there with a kernel of its
    own (297 kernels per DenseNet-BC-100 step, bench/results/compiled_time_h200.md)."""
    position = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if not _writes_input(node):
            continue
        written, value = node.args[:2]
        if sum(map(_writes_input, written.users)) > 1:  # writes to one input keep their order
            continue
        after = max((value, *(u for u in written.users if u is not node)), key=position.get)
        if after.op != "placeholder":
            after.append(node)


def _values_that_free_storage(graph: fx.Graph) -> set[fx.Node]:
    """The values whose computation frees a storage more than twice their size: its last reader.

    Inductor computes a pointwise value where a kernel first needs it, unless it is returned.
    In DenseNet-BC-100's least-budget backward the sum of two slices of 54 and 51 MiB gradients
    was computed at its convolution's backward, the end of its segment, holding both gradients
    across the recomputation of a concatenation and its BatchNorm (that segment peaked 82 MiB
    above its order, with a channels-last copy; 3 MiB with neither, H200). A segment returns
    these values, so that they are computed, and the storage freed, where the plan has it.
    Storages of placeholders and of returned values are held by the caller and never freed here.
    """
    storage_of: dict[fx.Node, StorageWeakRef] = {}
    nbytes: dict[StorageWeakRef, int] = {}
    for node in graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            storage_of[node] = StorageWeakRef(value.untyped_storage())
            nbytes[storage_of[node]] = value.untyped_storage().nbytes()
    held = {storage_of.get(node) for node in (*graph.find_nodes(op="placeholder"),
                                               *graph.output_node().all_input_nodes)}
    last_reader: dict[StorageWeakRef, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "call_function":
            for value in node.all_input_nodes:
                if value in storage_of:
                    last_reader[storage_of[value]] = node
    freed: dict[fx.Node, int] = {}
    for storage, node in last_reader.items():
        if storage not in held:
            freed[node] = freed.get(node, 0) + nbytes[storage]
    return {node for node, freed_bytes in freed.items()
            if node in storage_of and not _writes_input(node)
            and not getattr(node.target, "is_view", False)
            and freed_bytes > 2 * nbytes[storage_of[node]]}


def _writes_input(node: fx.Node) -> bool:
    return (node.target is torch.ops.aten.copy_.default and not node.users
            and node.args[0].op == "placeholder")


@contextlib.contextmanager
def _no_donated_buffers() -> Iterator[None]:
    """Compile a segment with no input inductor may overwrite.

    aot_autograd lets the backward overwrite the saved values it reads last ("donated
    buffers"), by their index among the whole backward's inputs, which inductor reads from the
    tracing context. A segment's inputs are numbered otherwise, and may be read again by later
    segments; and inductor's graph cache does not key on those indices, so a segment compiled
    with some could be reused where they are wrong. Without them a segment frees what it reads
    last and allocates anew, as the planned order assumes.
    """
    metadata = getattr(TracingContext.try_get(), "fw_metadata", None)
    if metadata is None:
        yield
        return
    whole_graph, metadata.bw_donated_idxs = metadata.bw_donated_idxs, []
    try:
        yield
    finally:
        metadata.bw_donated_idxs = whole_graph


def _stride(value: Any) -> tuple[int, ...] | None:
    return tuple(value.stride()) if isinstance(value, torch.Tensor) else None


def _restrided(value: Any, stride: tuple[int, ...] | None) -> Any:
    if not isinstance(value, torch.Tensor) or stride is None or tuple(value.stride()) == stride:
        return value
    return value.as_strided(value.size(), stride)
