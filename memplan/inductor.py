"""Compile the planned graphs with inductor, in segments that keep the planned lifetimes.

aot_autograd traces with inductor's decompositions (BatchNorm's, ReLU's backward's and detach's
are copied in after the trace, ``memplan.passes.decompose_by_template``) and calls memplan's
partition function; the forward and backward graphs it returns go to inductor's graph compiler.
Given a whole graph, inductor computes a pointwise value inside the kernel of a later consumer
and keeps what that value reads alive until then: on DenseNet-BC-100 the backward of the
least-budget plan peaked 411 MiB above the planned order (bench/results/compiled_peak_h200.md).
So each graph is cut into consecutive segments of at most ``OPS_PER_SEGMENT`` ops, compiled one
by one: inductor fuses within a segment, and every value that crosses a boundary is
materialised there and freed after the last segment that reads it, as the plan has it. The
copies of offloaded values (``memplan.passes.offload``) are segments of their own, run as they
are: on the GPT-2 medium step planned at 6.8 GiB on an H200, 96 of them each way ran beside
compute, and the step took 453 ms against torch.compile's 472-534 ms
(bench/results/offload_h200.md). Within a segment inductor may still hold a value longer than
planned, or allocate what the plan does not know of; five ways it did so are closed:

- A value whose computation frees a storage much larger than itself ends its segment, so that
  inductor computes it, and frees that storage, where the plan has it
  (``_values_that_free_storage``). Returning it from a segment that went on was not enough:
  inductor then fused it with its reader into one kernel writing both, while the storage was
  alive (GPT-2 medium, +512 MiB). Where it frees a storage its own segment computes and reads
  before it, it starts a segment instead, so that it is not fused into the kernel that computes
  that storage, before the plan has it (VGG19, +196 MiB); that segment goes on if an op reads
  the value before anything larger is allocated, as a ReLU's mask is read by a ``where``.
- An op that reads an input for its shape only is given an empty tensor of that shape
  (``_pass_shapes_not_values``), since inductor frees an input no kernel reads only when its
  segment returns.
- On CUDA, inductor's layout optimisation is off: it gave convolutions channels-last inputs,
  copying a concatenation while the original was still alive, a copy the plan does not know of.
  On the CPU, where mkldnn convolutions want channels-last, it is left on.
- On CUDA, kernels are not autotuned: pointwise kernels take one configuration, reductions the
  one inductor's deterministic mode picks (``force_filter_reduction_configs``, which changes
  nothing else), and no reduction's block is scaled down after compiling
  (``dynamic_scale_rblock``, which adds a configuration to benchmark). At its first call inductor benchmarks each kernel's configurations on clones of
  the buffers it writes in place, beside a buffer the size of the L2 cache that it writes to
  flush it (60 MiB on an H200), whatever the memory: ResNet-50's least graphed plan
  (channels-last, H200, fresh caches) peaked at 1.638 GiB in its first step, over its 1.598 GiB
  budget, and at 1.538 GiB without pointwise autotuning, as in a step with the tuning cached,
  for the same step time (27.2 ms against 27.6; bench/results/anchors_cnn_h200.md); DenseNet-40's
  least plan, with its reductions still autotuned, at 243.6 MiB against a 188.0 MiB budget
  (bench/results/fused_kernels_h200.md).
- On CUDA, each segment returns its values with the strides the plan traced them with, as
  inductor returns a model's own outputs (``_keep_planned_strides``). Inductor otherwise
  chooses the strides of what it returns, and later segments follow them: DenseNet-BC-100's
  backward (then compiled with layout optimisation on, see below) gave a 1x1 convolution's
  backward a channels-last input beside a contiguous gradient, and cuDNN took 66-72 MiB of
  scratch memory in full fp32 where the plan had measured none for the traced layouts
  (bench/results/segment_peaks_h200.md). Not on the CPU,
  where inductor's layout optimisation still gives convolutions channels-last layouts within a
  segment, and mkldnn rounded a convolution's input gradient differently on the mixed layouts
  this gave (3.8e-3 of its norm on DenseNet-40).

The plan's simulation counts the kernels inductor fuses (``memplan.liveness``): a pointwise
value computed inside its one reader's kernel, a pointwise op writing over an input that dies
there. Each pair of steps it counted on is marked on the graphs (``keep_fused_together``), and
a segment does not end while one is open, so that inductor sees both. Measured at their least
compiled budgets on an H200, with TF32 convolutions, the steps of VGG19 and ResNet-50
(channels-last) peaked 0.0% and 0.1% over their predictions, GPT-2 medium's 1.1% and
DenseNet-BC-100's 1.2% over, each within its budget; counted in the graph's order, GPT-2
medium's had measured 4.0% under its prediction (bench/results/fused_kernels_h200.md).

Segments with the same ops on the same shapes, strides and dtypes (the repeated layers of a
deep network) share one compilation (``_segment_key``); within its last ``CONTENT_CUT_OPS`` ops
a segment ends where its last ops' content says, so that such layers are cut alike. Inductor's own FX graph cache would
do so, but it passes over graphs traced without a shape environment, as memplan's are. Where
the strides are planned (CUDA), the distinct segments are compiled in worker processes at
once (``WORKERS``, ``memplan.compile_workers``), and the backward with the forward.

Buffer updates (BatchNorm's running statistics) stay in the compiled forward as writes into the
buffers, as torch.compile keeps them, rather than being copied back by aot_autograd's runtime,
a Python call per buffer per step; each write is moved next to the value it writes, so that it
is part of that value's segment. Dropout is drawn and replayed by memplan's own ops
(``memplan.passes.dropout``), which inductor calls as they are; other random ops use PyTorch's
generator too (``fallback_random``), so random values equal eager's. Loop reordering after
fusion is off: on torch 2.11 it asserts in the scheduler on planned DenseNet backward graphs
(``reorder_loops_by_dep_pair``). These options are set by the forward's and the backward's
compilers themselves: aot_autograd compiles the backward at its first call, when
``compile_with_inductor`` has returned.

Inductor may give a value other strides than eager's; each segment is compiled for the strides
the earlier ones report, and aot_autograd compiles the backward for the strides the forward
reports, through a ``TracingContext``. Dynamo provides one to ``memplan.backend``; ``optimize``
has none, so one is made here.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import operator
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._functorch.aot_autograd import aot_module_simplified
from torch._guards import TracingContext, detect_fake_mode, tracing
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

from memplan.compile_workers import WorkerPool, default_workers
from memplan.errors import InternalError
from memplan.heap import collecting, paused
from memplan.passes.decompose_by_template import TEMPLATED, decompose_by_template
from memplan.passes.offload import HOST_STEPS, wait_for_copies

# Measured on DenseNet-BC-100 at its least budget (H200): 50 ops per segment kept the compiled
# peak within 1.2% of the prediction, 150 went 4.6% over it, one segment 124% over it
# (bench/results/compiled_segments_h200.md).
OPS_PER_SEGMENT = 50
# Structurally identical segments share one compilation (``_segment_key``); off to compile every
# segment, as a diagnostic that inspects each one's code needs.
REUSE_IDENTICAL_SEGMENTS = True
# A segment ends where its content says within the last ``CONTENT_CUT_OPS`` ops it may hold, so
# that repeated layers are cut alike whatever precedes them, and share compilations: ResNet-1001's
# 1,935 segments compiled as 269 when cut every 50 ops, its 1,953 as 84 cut past 42
# (bench/results/segment_reuse_cpu.md). There, an op ends its segment where a CRC-32 of the last
# ``CONTENT_WINDOW`` ops (target and ``_describe`` of the value: dtype, shape, strides, ...) is a
# multiple of ``CONTENT_SPACING``: as deduplicating storage cuts data into chunks, the same ops
# end alike wherever they start.
CONTENT_CUT_OPS = 8
CONTENT_WINDOW = 4
CONTENT_SPACING = 8
# Node metadata: a node's step in the program, and the later steps counted as one kernel with it.
STEP, FUSED_WITH = "memplan_step", "memplan_fused_with"
# Worker processes compiling segments at once, where their strides are planned (on CUDA), or 1
# to compile each in this process, in turn (each worker holds a CUDA context, 520 MiB on an H200,
# while they compile). Planned and compiled ResNet-1001 in 94.5 s against 162.1 s, and 115.4 s
# against 135.6 s, on two H200 hosts (bench/results/compiled_resnet_h200.md), with the same code
# for every segment as compiled here (tests/test_compile_workers.py).
WORKERS = default_workers()
# A worker's CUDA context (an H200, ``nvidia-smi``). Only as many workers start as have twice that
# in the device's free memory: memplan's users plan where memory is short.
WORKER_CONTEXT_BYTES = 520 * 2**20
# Inductor options on CUDA only; the module docstring says why.
CUDA_OPTIONS = {"layout_optimization": False, "triton.autotune_pointwise": False,
                "test_configs.force_filter_reduction_configs": True, "dynamic_scale_rblock": False}
# Ops traced as they are rather than decomposed: inductor lowers them itself. Recent torch
# decomposes max-pooling's backward into a scatter-add over a zeros buffer, after copying a
# channels-last gradient and its int64 indices to reshape them: temporaries the plan would count
# and inductor fuses away. On VGG19 channels-last they set the least compiled budget at 3.98 GiB
# instead of 3.40 on the CPU.
KEPT_WHOLE = (torch.ops.aten.max_pool2d_with_indices_backward,)


def decompositions() -> dict[Any, Callable[..., Any]]:
    """Inductor's decomposition table without ``KEPT_WHOLE``."""
    from torch._inductor.decomposition import select_decomp_table
    kept = {overload for packet in KEPT_WHOLE for overload in
            (getattr(packet, name) for name in packet.overloads())}
    return {op: fn for op, fn in select_decomp_table().items() if op not in kept}


def compile_with_inductor(gm: fx.GraphModule, example_inputs: Sequence[Any],
                          partition: Callable[..., Any], *,
                          rewrite_forward: Callable[[fx.GraphModule], None] = lambda _: None,
                          rewrite_backward: Callable[[fx.GraphModule], None] = lambda _: None,
                          ) -> Callable[..., Any]:
    """``rewrite_forward`` and ``rewrite_backward`` change the partitioned graphs in place before
    inductor sees them (the eager executor's ``memplan.passes.offload``)."""
    from torch._inductor.compile_fx import compile_fx_inner

    on_cuda = any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in example_inputs)
    options = {"fallback_random": True, "loop_ordering_after_fusion": False}
    if on_cuda:
        options.update(CUDA_OPTIONS)

    workers = _workers_for(example_inputs)
    in_workers = workers > 1
    # Inductor's compilations make much cyclic garbage where they run in this process
    # (``memplan.heap``); handing graphs to workers makes little (``WorkerPool.compiling``
    # collects for those it compiles here).
    heap = paused if in_workers else collecting

    # Each compiler sets the options itself: aot_autograd compiles the backward at its first
    # call, after this function has returned (but where segments are compiled in workers).
    def compiler(rewrite: Callable[[fx.GraphModule], None], is_backward: bool = False):
        def compile_graph(graph: fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
            rewrite(graph)
            with torch._inductor.config.patch(options), heap():
                content_from = OPS_PER_SEGMENT - CONTENT_CUT_OPS
                return compile_in_segments(graph, inputs,
                                           functools.partial(compile_fx_inner, is_backward=is_backward),
                                           OPS_PER_SEGMENT, planned_strides=on_cuda,
                                           min_ops_per_segment=content_from if content_from > 0 else None)
        return compile_graph

    with torch._inductor.config.patch(options):  # the table depends on fallback_random
        table = decompositions()
    traced = {op: fn for op, fn in table.items() if op not in TEMPLATED}  # the rest copied after

    def decompose(graph: fx.GraphModule) -> None:
        with paused():  # the inference compiler runs it while inductor's compilations collect
            decompose_by_template(graph.graph, table)

    def partition_decomposed(joint: fx.GraphModule, inputs: Any, **kwargs: Any) -> Any:
        decompose(joint)
        return partition(joint, inputs, **kwargs)

    context = contextlib.nullcontext()
    if TracingContext.try_get() is None:
        fake_mode = detect_fake_mode(example_inputs) or FakeTensorMode(allow_non_fake_inputs=True)
        context = tracing(TracingContext(fake_mode))
    with context, torch._inductor.config.patch(options), paused(), _in_workers(workers):
        return aot_module_simplified(gm, list(example_inputs), fw_compiler=compiler(rewrite_forward),
                                     bw_compiler=compiler(rewrite_backward, is_backward=True),
                                     inference_compiler=compiler(decompose),  # not planned
                                     partition_fn=partition_decomposed,
                                     decompositions=traced,
                                     keep_inference_input_mutations=True)


def _workers_for(example_inputs: Sequence[Any]) -> int:
    """``WORKERS`` where the inputs are on CUDA, fewer where their contexts would not fit twice
    in the device's free memory; 1 elsewhere."""
    devices = {t.device for t in example_inputs if isinstance(t, torch.Tensor) and t.device.type == "cuda"}
    if not devices:
        return 1
    free_bytes = min(torch.cuda.mem_get_info(device)[0] for device in devices)
    return max(1, min(WORKERS, free_bytes // (2 * WORKER_CONTEXT_BYTES)))


@contextlib.contextmanager
def _in_workers(workers: int) -> Iterator[None]:
    """Compile the segments in ``workers`` worker processes (if more than 1), where their strides
    are planned (on CUDA): each one's inputs are then known before the earlier ones are compiled.
    The backward is compiled with the forward, so that its segments are handed out while the
    forward's compile, and so that the workers, each holding a CUDA context, are closed before
    the first step."""
    if workers <= 1:
        yield
        return
    pool = WorkerPool(workers)
    try:
        with torch._functorch.config.patch(force_non_lazy_backward_lowering=True), pool.compiling():
            yield
    finally:
        pool.close()


@dataclass
class _Segment:
    run: Callable[[list], Any]  # boxed: empties its argument list
    inputs: list[fx.Node]
    last_reads: list[bool]  # per input: no later segment reads it
    outputs: list[fx.Node]


def compile_in_segments(graph: fx.GraphModule, example_inputs: Sequence[Any],
                        compile_graph: Callable[..., Any], ops_per_segment: int, *,
                        min_ops_per_segment: int | None = None,
                        planned_strides: bool = False) -> Callable[[list], Any]:
    """Compile ``graph`` as consecutive segments and return one boxed callable that runs them.

    A segment has at most ``ops_per_segment`` ops; with ``min_ops_per_segment``, past that many
    it ends where its last ops' content says (``CONTENT_CUT_OPS``).

    A multi-output op stays in one segment with its ``getitem`` users, so that segments pass
    tensors only. The strides each compiled segment reports for its outputs are the example
    inputs of the next, and are reported in turn for the graph's outputs. A segment ends early
    at a value of ``_values_that_free_storage``; one that frees a storage the segment computes
    and reads before it starts a segment instead, which goes on if it is read soon after
    (``_read_soon_after``). With ``planned_strides`` each segment returns
    its values with the strides of ``graph`` (``_keep_planned_strides``). A call of the offload
    pass (``HOST_STEPS``) is a segment of its own, run as it is.
    """
    _move_input_writes_to_their_values(graph.graph)
    _pass_shapes_not_values(graph.graph)
    placeholders = list(graph.graph.find_nodes(op="placeholder"))
    returned = graph.graph.output_node().args[0]
    segment_of: dict[fx.Node, int] = {}  # in graph order
    frees_storage = _values_that_free_storage(graph.graph)
    count, in_segment = 0, ops_per_segment  # the first op starts segment 0
    on_host: set[int] = set()  # segments of one host step, run as they are
    recent: collections.deque[bytes] = collections.deque(maxlen=CONTENT_WINDOW)
    steps = {node.meta[STEP] for node in graph.graph.nodes if STEP in node.meta}
    waiting: set[int] = set()  # steps still to join the open segment: ends of fused pairs
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target is operator.getitem:
            segment_of[node] = segment_of[node.args[0]]
        elif node.op == "call_function" and node.target in HOST_STEPS:
            if waiting:
                raise InternalError(f"an offload copy ({node.name}) falls between two steps the "
                                    "plan counted as one kernel's")
            count, in_segment = count + 1, ops_per_segment  # alone in its segment
            segment_of[node] = count - 1
            on_host.add(count - 1)
        elif (_writes_input(node) and node.prev in segment_of
              and segment_of[node.prev] not in on_host):  # placed after what it must follow
            segment_of[node] = segment_of[node.prev]
        elif node.op == "call_function":
            starts = node in frees_storage and _read_before_in_segment(
                node, frees_storage[node], segment_of, count - 1)
            if (in_segment >= ops_per_segment or starts) and not waiting:
                count, in_segment = count + 1, 0
            segment_of[node] = count - 1
            in_segment += 1
            recent.append(f"{node.target} {_describe(node.meta.get('val'))}".encode())
            ends = node in frees_storage and not (starts and _read_soon_after(node))
            if ends or (
                    min_ops_per_segment is not None and in_segment >= min_ops_per_segment
                    and zlib.crc32(b"|".join(recent)) % CONTENT_SPACING == 0):
                in_segment = ops_per_segment  # the next op starts a segment
        elif node.op not in ("placeholder", "get_attr", "output"):
            raise InternalError(f"aot_autograd gave inductor a graph with a {node.op} node "
                                f"({node.name}); memplan compiles placeholders, constants and "
                                "calls of functions only")
        if node in segment_of:
            waiting.discard(node.meta.get(STEP))
            waiting.update(step for step in node.meta.get(FUSED_WITH, ()) if step in steps)
    _check_fused_together(segment_of)
    last_read: dict[fx.Node, int] = {}
    for node, segment in segment_of.items():
        for value in node.all_input_nodes:
            last_read[value] = segment
    for value in graph.graph.output_node().all_input_nodes:
        last_read[value] = count
    constants = {node: operator.attrgetter(node.target)(graph)  # returned as they are
                 for node in graph.graph.find_nodes(op="get_attr") if last_read.get(node) == count}

    example = dict(zip(placeholders, example_inputs))
    stride = {node: _stride(value) for node, value in example.items()}
    members_of: list[list[fx.Node]] = [[] for _ in range(count)]
    for node, segment in segment_of.items():
        members_of[segment].append(node)
    segments = []
    compiled: dict[str, tuple[Callable[[list], Any], list | None]] = {}
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
        returned_node = sub.output(tuple(env[node] for node in outputs))
        if planned_strides:
            _keep_planned_strides(returned_node, outputs)
        if k in on_host:  # a copy: its outputs have the strides of what it copies
            run, strides = _run_as_is(fx.GraphModule(graph, sub)), [stride[inputs[0]]] * len(outputs)
        else:
            examples = [example[value] if value in example else
                        _restrided(value.meta.get("val"), stride[value]) for value in inputs]
            key = _segment_key(sub, examples) if REUSE_IDENTICAL_SEGMENTS else None
            if key is None or key not in compiled:
                with TracingContext.report_output_strides() as strides, _no_donated_buffers():
                    run = compile_graph(fx.GraphModule(graph, sub), examples)
                if planned_strides and not strides:  # a worker's compilation reports none
                    strides = [_stride(node.meta.get("val")) for node in outputs]
                if key is not None:
                    compiled[key] = run, strides
            else:
                run, strides = compiled[key]
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
        try:
            for segment in segments:
                inputs = [values.pop(v) if last else values[v]
                          for v, last in zip(segment.inputs, segment.last_reads)]
                values.update(zip(segment.outputs, segment.run(inputs)))
        except BaseException:
            wait_for_copies()  # before the failed step's values are freed
            raise
        return [values[v] if isinstance(v, fx.Node) else v for v in returned]

    run_segments._boxed_call = True
    return run_segments


def keep_fused_together(forward: fx.GraphModule, backward: fx.GraphModule,
                        fused: Sequence[tuple[int, int]]) -> None:
    """Mark the split graphs' steps (forward, then backward: one node per program step) with
    the pairs the plan counted as one kernel's (``memplan.liveness.Timeline.fused``), which
    ``compile_in_segments`` keeps in one segment."""
    steps = [node for module in (forward, backward) for node in module.graph.nodes
             if node.op == "call_function"]
    for step, node in enumerate(steps):
        node.meta[STEP] = step
    for first, last in fused:
        steps[first].meta[FUSED_WITH] = (*steps[first].meta.get(FUSED_WITH, ()), last)


def _check_fused_together(segment_of: dict[fx.Node, int]) -> None:
    segment_of_step = {node.meta[STEP]: segment for node, segment in segment_of.items()
                       if STEP in node.meta}
    for node, segment in segment_of.items():
        for step in node.meta.get(FUSED_WITH, ()):
            if segment_of_step.get(step, segment) != segment:
                raise InternalError(f"{node.name} and step {step} were counted as one kernel's "
                                    "but fell in different segments")


def _run_as_is(module: fx.GraphModule) -> Callable[[list], Any]:
    return lambda args: module(*args)


def _keep_planned_strides(output: fx.Node, values: list[fx.Node]) -> None:
    """Have inductor return ``values`` with the strides they have in the planned graph, by
    marking them as a model's outputs ("user visible"), whose strides it keeps."""
    output.meta["user_visible_output_idxs"] = list(range(len(values)))
    output.meta["original_output_strides"] = [_stride(v.meta.get("val")) for v in values]


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


# Arguments that inductor's lowering of an op reads for their size, strides and dtype only; where
# it falls back to the ATen kernel, that kernel does not read their data either.
_SHAPE_ONLY_ARGUMENTS = {
    torch.ops.aten.avg_pool2d_backward.default: 1,
    torch.ops.aten.avg_pool3d_backward.default: 1,
}


def _pass_shapes_not_values(graph: fx.Graph) -> None:
    """Give an op that reads an argument for its shape only an empty tensor of that shape.

    Inductor frees a segment's input after the last kernel that reads it. An input that no
    kernel reads is never freed there: it stays alive until the segment returns, where the plan
    frees it after its last reader. In DenseNet-BC-100's least-budget backward that held a 27 MiB
    convolution output, the input of an ``avg_pool2d_backward``, across the convolution backward
    after it, and set the step's peak (H200, bench/results/segment_peaks_h200.md). Inductor
    drops the empty tensor, which no kernel reads, and the value is freed by the segment that
    last reads its data. The joint graph already gives most 2-d poolings a one-number stand-in
    (``memplan.passes.backward_reads``), so that the plan need not keep the value either; this
    covers the others.
    """
    for op, index in _SHAPE_ONLY_ARGUMENTS.items():
        for node in graph.find_nodes(op="call_function", target=op):
            value = node.args[index]
            val = value.meta.get("val") if isinstance(value, fx.Node) else None
            if not isinstance(val, torch.Tensor):
                continue
            with graph.inserting_before(node):
                empty = graph.call_function(torch.ops.aten.empty_strided.default,
                                            (list(val.shape), list(val.stride())),
                                            {"dtype": val.dtype, "device": val.device})
            with getattr(val, "fake_mode", None) or contextlib.nullcontext():
                empty.meta["val"] = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype,
                                                        device=val.device)
            node.update_arg(index, empty)


def _values_that_free_storage(graph: fx.Graph) -> dict[fx.Node, list[list[fx.Node]]]:
    """The values whose computation frees storage more than twice their size (its last reader),
    each with the values of every storage it frees (in graph order: the one that computes it,
    then its views).

    Inductor computes a pointwise value where a kernel first needs it. In DenseNet-BC-100's
    least-budget backward the sum of two slices of 54 and 51 MiB gradients was computed at its
    convolution's backward, the end of its segment, holding both gradients across the
    recomputation of a concatenation and its BatchNorm (H200). Each of these values ends its
    segment. It also fuses a pointwise value with the kernel that computes what it reads: in
    VGG19's least-budget backward (channels-last) the mask of a recomputed ReLU was written with
    the ReLU, before the convolution's backward that reads the ReLU, 196 MiB above the plan at
    its peak (H200). So each of these values that frees a storage its own segment computes and
    reads before it starts a segment instead (``_read_before_in_segment``). Storages of
    placeholders and of returned values are held by the caller and never freed here.
    """
    storage_of = _storages(graph)
    values_of: dict[fx.Node, list[fx.Node]] = collections.defaultdict(list)
    nbytes: dict[fx.Node, int] = {}
    for node, storage in storage_of.items():
        values_of[storage].append(node)
        nbytes[storage] = node.meta["val"].untyped_storage().nbytes()
    held = {storage_of.get(node) for node in (*graph.find_nodes(op="placeholder"),
                                               *graph.output_node().all_input_nodes)}
    last_reader: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "call_function":
            for value in node.all_input_nodes:
                if value in storage_of:
                    last_reader[storage_of[value]] = node
    freed: dict[fx.Node, list[fx.Node]] = {}
    for storage, node in last_reader.items():
        if storage not in held:
            freed.setdefault(node, []).append(storage)
    return {node: [values_of[storage] for storage in storages]
            for node, storages in freed.items()
            if node in storage_of and not _writes_input(node)
            and not getattr(node.target, "is_view", False)
            and sum(nbytes[storage] for storage in storages) > 2 * nbytes[storage_of[node]]}


def _storages(graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """Each tensor value's storage, named by the node that computes it. A recomputed value
    shares its traced value, and so its traced storage, with every other computation of it (the
    backward graph copies the node): a value refers to the storage of a value it reads, as a
    view does, or to its own."""
    storage_of: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        storage = StorageWeakRef(value.untyped_storage())
        read = [j for i in node.all_input_nodes  # a piece of a multi-output op: what it read
                for j in (i.all_input_nodes if node.target is operator.getitem else [i])]
        storage_of[node] = next((storage_of[i] for i in read if i in storage_of and StorageWeakRef(
            i.meta["val"].untyped_storage()) == storage), node)
    return storage_of


def _read_before_in_segment(node: fx.Node, storages: list[list[fx.Node]],
                            segment_of: dict[fx.Node, int], segment: int) -> bool:
    """Whether one of the storages ``node`` frees (each given by its values: the one that
    computes it, then its views) is computed in ``segment`` and read there before ``node`` by an
    op that is not one of its views: inductor could then write ``node`` with it, while that
    reader still holds it."""
    return any(segment_of.get(values[0]) == segment and any(
        user is not node and user not in values and segment_of.get(user) == segment
        for value in values for user in value.users) for values in storages)


def _read_soon_after(node: fx.Node) -> bool:
    """Whether an op reads ``node`` before the ops after it allocate more than it holds (as a
    ReLU's mask is read by a ``where`` after its scalar): inductor may compute it in that op's
    kernel without holding what it frees across anything larger."""
    held, allocated, after = node.meta["val"].untyped_storage().nbytes(), 0, node.next
    while after.op == "call_function" and after not in node.users:
        allocated += sum(value.untyped_storage().nbytes()
                         for value in pytree.tree_leaves(after.meta.get("val"))
                         if isinstance(value, torch.Tensor))
        if allocated > held:
            return False
        after = after.next
    return after in node.users


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


class _Position:
    """A value of a segment, named by its position, for ``_segment_key``."""

    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"%{self.index}"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return (f"{value.dtype}{list(value.shape)}{list(value.stride())}@{value.device}"
                f"+{value.storage_offset()}{'g' if value.requires_grad else ''}")
    if isinstance(value, (tuple, list)):
        return f"({','.join(map(_describe, value))})"
    return type(value).__name__ if value is None or isinstance(value, torch.Generator) else repr(value)


def _segment_key(sub: fx.Graph, examples: Sequence[Any]) -> str | None:
    """What compiling a segment depends on: its ops, their arguments with the values they read
    named by position, each value's dtype, shape and strides, and its inputs', with which of
    them share a storage. Segments with equal keys compile to the same code, so the repeated
    layers of a deep network compile once. None where an argument is a tensor, whose value a
    key cannot hold."""
    first_of_storage: dict[StorageWeakRef, int] = {}  # by position: inputs sharing a storage
    lines = []
    for i, example in enumerate(examples):
        shared = ""
        if isinstance(example, torch.Tensor):
            shared = f" in {first_of_storage.setdefault(StorageWeakRef(example.untyped_storage()), i)}"
        lines.append(_describe(example) + shared)
    position = {node: _Position(i) for i, node in enumerate(sub.nodes)}
    for node in sub.nodes:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), position.__getitem__)
        if any(isinstance(a, torch.Tensor) for a in pytree.tree_leaves((args, kwargs))):
            return None
        target = "" if node.op == "placeholder" else node.target  # a placeholder's is its name
        lines.append(f"{node.op} {target} {args!r} {kwargs!r} {_describe(node.meta.get('val'))}")
    return "\n".join(lines)


def _stride(value: Any) -> tuple[int, ...] | None:
    return tuple(value.stride()) if isinstance(value, torch.Tensor) else None


def _restrided(value: Any, stride: tuple[int, ...] | None) -> Any:
    if not isinstance(value, torch.Tensor) or stride is None or tuple(value.stride()) == stride:
        return value
    return value.as_strided(value.size(), stride)
