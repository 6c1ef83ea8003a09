"""Capture: the model's training step as one joint forward+backward ATen graph, and its IR.

``torch.export`` (non-strict) traces the model under FakeTensor, so no real compute runs and
every node carries its ``nn.Module`` path; ``aot_module_simplified`` then functionalizes it and
builds the joint graph, which it hands to a partition function. memplan's partition function
turns the joint graph into a :class:`~memplan.graph.JointGraph`, asks the planner for a
:class:`~memplan.program.Program`, and splits the joint graph accordingly. What comes back is a
callable that runs the captured graphs directly: no tracing and no dynamo at call time.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._functorch.aot_autograd import aot_module_simplified
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx._lazy_graph_module import _use_lazy_graph_module
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import flop_registry

from memplan.cost_models.analytic import CONVOLUTIONS, allows_tf32
from memplan.cost_models.workspace import measure_workspaces
from memplan.errors import CaptureError
from memplan.executor import boxed
from memplan.heap import paused
from memplan.inductor import compile_with_inductor, keep_fused_together
from memplan.passes.backward_reads import (compute_masks_in_forward, read_shapes_only,
                                           tangent_dependent)
from memplan.passes.buffer_updates import (free_backward_of_running_stats,
                                           recompute_without_running_stats, update_buffers_in_place)
from memplan.passes.causal_attention import use_causal_attention
from memplan.passes.cudnn_batch_norm import use_cudnn_batch_norm
from memplan.passes.dropout import (draw, recompute_dropout_from_mask, replay_dropout_masks,
                                    reuse_draws_in_forward)
from memplan.passes.offload import fetch_in_backward, offload_in_forward
from memplan.passes.partition import split
from memplan.graph import (CUDA_ALLOCATOR_ROUNDING, Category, JointGraph, Node, Phase, Storage,
                           allocated_bytes)
from memplan.liveness import simulate
from memplan.program import Program
from memplan.sac import op_family, op_name

log = logging.getLogger(__name__)

Planner = Callable[[JointGraph, fx.GraphModule], Program]  # the IR, and the joint it came from


@dataclass
class CapturedStep:
    """A captured training step: call it with the flat inputs, get the flat outputs."""

    run: Callable[..., Any]
    graph: JointGraph
    program: Program
    fx_joint: fx.GraphModule  # for its graph: reading its code writes it anew, after the passes
    fx_compiled: list[fx.GraphModule]  # forward, then backward once aot_autograd compiles it


def _flat_module(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[fx.GraphModule, Any, int]:
    """Export the model and give it a flat calling convention: flat tensors in, flat tensors out."""
    try:
        # Lazy, the exported modules write no Python code unless run: aot_autograd interprets
        # the graph (on ResNet-1001, 0.8 s less of 11.7 on a CPU).
        with _use_lazy_graph_module(True):
            exported = torch.export.export(model, args, kwargs, strict=False)
    except Exception as error:  # export raises many types; all mean "could not capture"
        raise CaptureError(
            f"memplan could not capture {type(model).__name__}'s forward with torch.export "
            f"(non-strict): {type(error).__name__}: {str(error).strip().splitlines()[0]}\n"
            "The traceback above names the line where tracing broke. Make that code traceable "
            "(no data-dependent Python control flow on tensor values, no .item() in branches), "
            "or plan the submodules that are traceable."
        ) from error
    with _use_lazy_graph_module(True):
        gm = exported.module()
        out_spec = gm._out_spec if hasattr(gm, "_out_spec") else exported.call_spec.out_spec
        gm.graph._codegen = fx.graph.CodeGen()
        _drop_guard_calls(gm)
        gm.recompile()
    user_outputs = len(next(iter(reversed(gm.graph.nodes))).args[0])
    return gm, out_spec, user_outputs


# Checks that tracing ``.to()`` leaves in the graph: they produce nothing, and as impure nodes
# they would survive into the forward graph without being part of the Program.
_METADATA_CHECKS = (torch.ops.aten._assert_tensor_metadata.default,)


def _written_in_place(gm: fx.GraphModule) -> frozenset[tuple[str, str, int]]:
    """Values eager computes or overwrites in place (``relu_`` and the BatchNorm output it writes),
    keyed by module path, op family and ordinal within the module, as the joint graph finds them.

    Export keeps the model's in-place ops; the joint graph is functional and has lost them."""
    keys: dict[fx.Node, tuple[str, str, int]] = {}
    seen: dict[tuple[str, str], int] = {}
    written: set[tuple[str, str, int]] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        path_family = (_module_path(node), op_family(str(node.target)))
        keys[node] = (*path_family, seen.get(path_family, 0))
        seen[path_family] = seen.get(path_family, 0) + 1
        target = node
        if _writes_first_argument(node):
            while isinstance(target, fx.Node) and target in keys:  # the chain of aliases written
                written.add(keys[target])
                if not (target.target.is_view or _writes_first_argument(target)):
                    break
                target = target.args[0]
    return frozenset(written)


def _writes_first_argument(node: fx.Node) -> bool:
    arguments = node.target._schema.arguments
    return bool(arguments) and arguments[0].alias_info is not None and arguments[0].alias_info.is_write


def _drop_metadata_checks(joint: fx.GraphModule) -> None:
    for node in list(joint.graph.nodes):
        if node.op == "call_function" and node.target in _METADATA_CHECKS and not node.users:
            joint.graph.erase_node(node)


def _drop_guard_calls(gm: fx.GraphModule) -> None:
    """Exported modules check their input guards in-graph; the planned module checks shapes itself."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")


_BATCH_NORM = torch.ops.aten._native_batch_norm_legit_functional.default


def _is_random(node: fx.Node) -> bool:
    return node.target is draw or (
        isinstance(node.target, torch._ops.OpOverload)
        and torch.Tag.nondeterministic_seeded in node.target.tags)


def _must_save(node: fx.Node) -> bool:
    """Random values, and the running statistics a training BatchNorm writes back."""
    if node.target is operator.getitem:
        parent, index = node.args
        return _is_random(parent) or (parent.target is _BATCH_NORM and index >= 3)
    return _is_random(node)


def _state_inputs(node: fx.Node) -> tuple[str, ...]:
    """Training BatchNorm reads its running statistics only to write new ones: its output,
    mean and inverse std do not depend on them, so a recomputation may read the mutated buffer."""
    if node.target is _BATCH_NORM and node.args[5]:
        return tuple(a.name for a in node.args[3:5] if isinstance(a, fx.Node))
    return ()


def _target(described: Any) -> str | None:
    """The parameter or buffer name an aot_autograd descriptor (or a placeholder's) names."""
    desc = described.meta.get("desc") if isinstance(described, fx.Node) else described
    return getattr(desc, "target", None)


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self__.", "")


def _tensors(value: Any) -> list[torch.Tensor]:
    return [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def _flops(node: fx.Node) -> int:
    packet = getattr(node.target, "overloadpacket", None)
    if packet not in flop_registry:
        return 0
    args, kwargs = pytree.tree_map_only(fx.Node, lambda n: n.meta.get("val"), (node.args, node.kwargs))
    try:
        return int(flop_registry[packet](*args, **kwargs, out_val=node.meta.get("val")))
    except Exception:  # a formula that does not accept these arguments: count no FLOPs
        log.debug("no FLOP formula applies to %s", node.format_node())
        return 0


def _precision(node: fx.Node) -> str:
    """The math a FLOP-counted op runs in: float32 matrix products and convolutions on CUDA run
    in TF32 where torch's settings allow it (cuDNN's by default, cuBLAS's by
    ``torch.set_float32_matmul_precision("high")``), as the step will."""
    tensors = _tensors(node.meta.get("val"))
    if not tensors:
        return ""
    dtype = tensors[0].dtype
    if dtype == torch.float32 and tensors[0].device.type == "cuda":
        return "tf32" if allows_tf32(op_name(node.target).startswith(CONVOLUTIONS)) else "fp32"
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype).removeprefix("torch."))


def _covers_storage(tensor: torch.Tensor) -> bool:
    """Its elements fill its storage, each once: strides, sorted, are a contiguous layout's."""
    if tensor.storage_offset() or tensor.numel() * tensor.element_size() != tensor.untyped_storage().nbytes():
        return False
    expected = 1
    for size, stride in sorted(((size, stride) for size, stride in zip(tensor.shape, tensor.stride())
                                if size != 1), key=lambda pair: pair[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def joint_to_ir(joint: fx.GraphModule, num_fwd_outputs: int, *, user_outputs: int,
                param_count: int, buffer_count: int, rounding: int,
                workspaces: dict[str, int] | None = None, ambient_bytes: int = 0,
                written_in_place: frozenset[tuple[str, str, int]] = frozenset(),
                compiled: bool = False) -> JointGraph:
    """The fx joint graph as a JointGraph: storages from the fake values' aliasing.

    The loss is modelled as the caller's ``out.float().sum().backward()`` makes it: a float32
    scalar and the scalar gradient seed of its backward."""
    storage_ids: dict[StorageWeakRef, int] = {}
    storages: list[Storage] = []
    nodes: list[Node] = []
    output_node = next(iter(reversed(joint.graph.nodes)))
    fwd_outputs = [o for o in output_node.args[0][:num_fwd_outputs] if isinstance(o, fx.Node)]
    bwd_outputs = [o for o in output_node.args[0][num_fwd_outputs:] if isinstance(o, fx.Node)]
    gradient_nodes = set(bwd_outputs)
    # aot_autograd's descriptors name what each input is and which buffers the step mutates.
    mutated = {_target(d.mutated_input) for d in output_node.meta.get("desc", ())
               if type(d).__name__ == "InputMutationAOTOutput"}
    # Where the mutations are kept in the graph (the compiled path), a copy_ into the input.
    mutated |= {_target(n.args[0]) for n in joint.graph.nodes
                if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                and _writes_first_argument(n)
                and isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder"}
    backward_phase = _phases(joint, set(fwd_outputs))
    primal_index = 0
    ordinals: dict[tuple[str, str], int] = {}
    for node in joint.graph.nodes:
        if node.op == "output":
            continue
        if node.op == "placeholder":
            is_tangent = node.name.startswith("tangents")
            phase = Phase.TANGENT if is_tangent else Phase.PRIMAL
            if is_tangent:
                category = Category.TEMPORARY
            else:
                kind = type(node.meta.get("desc")).__name__  # e.g. ParamAOTInput
                category = (Category.PARAMETER if "Param" in kind or primal_index < param_count else
                            Category.BUFFER if "Buffer" in kind or primal_index < param_count + buffer_count
                            else Category.INPUT)
                primal_index += 1
        elif node.op == "get_attr":  # a tensor constant (torch.tensor(...) in forward): resident
            phase, category = Phase.PRIMAL, Category.BUFFER
        else:
            phase = backward_phase[node]
            category = (Category.GRADIENT if node in gradient_nodes else
                        Category.ACTIVATION if phase is Phase.FORWARD else Category.TEMPORARY)
        value = node.meta.get("val")
        refs = []
        for tensor in _tensors(value):
            key = StorageWeakRef(tensor.untyped_storage())
            if key not in storage_ids:
                nbytes = tensor.untyped_storage().nbytes()
                storage_ids[key] = len(storages)
                storages.append(Storage(allocated_bytes(nbytes, rounding), category,
                                        str(tensor.dtype).removeprefix("torch.")))
            refs.append(storage_ids[key])
        target = node.target
        written = False
        if phase is Phase.FORWARD and node.op == "call_function":
            path_family = (_module_path(node), op_family(str(target)))
            ordinal = ordinals.get(path_family, 0)
            ordinals[path_family] = ordinal + 1
            written = (*path_family, ordinal) in written_in_place
        inputs = tuple(dict.fromkeys(n.name for n in node.all_input_nodes))
        moved = sum(t.untyped_storage().nbytes() for n in node.all_input_nodes
                    for t in _tensors(n.meta.get("val")))
        flops = _flops(node) if node.op == "call_function" else 0
        nodes.append(Node(
            name=node.name, phase=phase, inputs=inputs, storages=tuple(dict.fromkeys(refs)),
            op=op_name(target),
            module_path=_module_path(node), must_save=_must_save(node),
            mutated=phase is Phase.PRIMAL and _target(node) in mutated,
            state_inputs=_state_inputs(node),
            mutates=isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable,
            is_tensor=isinstance(value, torch.Tensor),
            flops=flops,
            precision=_precision(node) if flops else "",
            bytes_moved=moved + sum(storages[s].nbytes for s in refs),
            workspace_bytes=(workspaces or {}).get(node.name, 0),
            written_in_place=written,
            pointwise=isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags,
            dense=isinstance(value, torch.Tensor) and _covers_storage(value),
        ))
    by_name = {node.name: node for node in nodes}
    for output in bwd_outputs:  # a gradient is often a view of a temporary: its storage is a gradient
        for s in by_name[output.name].storages:
            storages[s] = replace(storages[s], category=Category.GRADIENT)
    return JointGraph(nodes=tuple(nodes), storages=tuple(storages),
                      forward_outputs=tuple(n.name for n in fwd_outputs),
                      user_output_count=user_outputs,
                      backward_outputs=tuple(n.name for n in bwd_outputs),
                      ambient_bytes=ambient_bytes, loss_bytes=2 * allocated_bytes(4, rounding),
                      compiled=compiled)


def _create_blas_workspaces(ones: torch.Tensor) -> None:
    """Create the calling thread's cuBLAS workspaces if they do not exist yet: cuBLAS keeps one
    per thread's handle and stream, and they stay allocated."""
    ones.mm(ones)  # cuBLAS's own
    torch.nn.functional.linear(ones, ones, ones[0])  # and cuBLASLt's, used by addmm with bias


class _BackwardWorkspaces(torch.autograd.Function):
    """Autograd runs a CUDA backward on its device thread, whose handle has workspaces of its
    own (32 MiB and 1 MiB more on an H200, measured: ``bench/diag/step_start.py``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        _create_blas_workspaces(grad)
        return grad


def _ambient_bytes(model: torch.nn.Module, flat_inputs: Sequence[Any], device: torch.device) -> int:
    """Memory on the CUDA device that the step does not own but its peak includes: other
    tensors of the process and the cuBLAS workspaces of the forward's and the backward's
    threads (created here if they do not exist yet)."""
    if device.type != "cuda":
        return 0
    ones = torch.ones(8, 8, device=device, requires_grad=True)
    with torch.no_grad():
        _create_blas_workspaces(ones)
    # aot_autograd, which calls this, turns off autograd's device threads
    with torch.enable_grad(), torch.autograd.set_multithreading_enabled(True):
        _BackwardWorkspaces.apply(ones).sum().backward()
    del ones
    owned = {StorageWeakRef(t.untyped_storage()): t.untyped_storage().nbytes()
             for t in [*model.parameters(), *model.buffers(), *_tensors(flat_inputs),
                       *(p.grad for p in model.parameters() if p.grad is not None)]
             if t.device == device}
    owned_bytes = sum(allocated_bytes(n, CUDA_ALLOCATOR_ROUNDING) for n in owned.values())
    return max(0, torch.cuda.memory_allocated(device) - owned_bytes)


def _phases(joint: fx.GraphModule, forward_outputs: set[fx.Node]) -> dict[fx.Node, Phase]:
    """Backward: what depends on a tangent, or is tagged backward and feeds only backward.

    Joint-graph passes (inductor's CSE, decompositions) can leave a node tagged backward that a
    forward value needs; such a node runs in the forward."""
    phases: dict[fx.Node, Phase] = {}
    dependent = tangent_dependent(joint.graph)
    for node in reversed(joint.graph.nodes):
        if node.op in ("placeholder", "output"):
            continue
        tagged = node.meta.get("partitioner_tag") == "is_backward"
        feeds_forward = node in forward_outputs or any(
            phases.get(u) is Phase.FORWARD for u in node.users)
        backward = node in dependent or (tagged and not feeds_forward)
        phases[node] = Phase.BACKWARD if backward else Phase.FORWARD
    return phases


def device_of(model: torch.nn.Module, flat_inputs: Sequence[Any]) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers(), *_tensors(flat_inputs)]:
        return tensor.device
    return torch.device("cpu")


Partition = Callable[..., tuple[fx.GraphModule, fx.GraphModule]]


def make_partition(planner: Planner, result: dict[str, Any], *, device: torch.device,
                   user_outputs: int, param_count: int, buffer_count: int,
                   model: torch.nn.Module | None = None, flat_inputs: Sequence[Any] = (),
                   eager: bool = True,
                   written_in_place: frozenset[tuple[str, str, int]] = frozenset()) -> Partition:
    """The partition function aot_autograd calls with the joint graph: IR, plan, split.

    What it planned is left in ``result`` (graph, program, joint). Without ``model`` (the
    torch.compile path, where inputs are fake) the device's other memory is not measured.
    The passes rewrite the joint graph, which is never run: they do not regenerate its Python
    code (on ResNet-1001 each regeneration took over a second)."""
    rounding = CUDA_ALLOCATOR_ROUNDING if device.type == "cuda" else 1

    def partition(joint: fx.GraphModule, _inputs: Any, *, num_fwd_outputs: int, **_: Any):
        # Called within aot_autograd's trace, where collections are paused (memplan.heap)
        _drop_metadata_checks(joint)
        free_backward_of_running_stats(joint)
        # inductor has no lowering of native_dropout_backward: it is given the decomposition
        recompute_dropout_from_mask(joint, decomposed=not eager)
        replay_dropout_masks(joint)
        if not eager:  # inductor's lowerings and decompositions make these reads separable
            read_shapes_only(joint)
            compute_masks_in_forward(joint)
        with _disable_current_modes():  # aot_autograd partitions under FakeTensorMode
            use_causal_attention(joint)
            workspaces = measure_workspaces(joint, device, compiled=not eager)
            ambient_bytes = _ambient_bytes(model, flat_inputs, device) if model is not None else 0
        graph = joint_to_ir(joint, num_fwd_outputs, user_outputs=user_outputs,
                            param_count=param_count, buffer_count=buffer_count, rounding=rounding,
                            workspaces=workspaces, ambient_bytes=ambient_bytes,
                            written_in_place=written_in_place, compiled=not eager)
        program = planner(graph, joint)
        result.update(graph=graph, program=program, joint=joint)
        forward, backward = split(joint, graph, program, num_fwd_outputs)
        if not eager:
            keep_fused_together(forward, backward, simulate(graph, program).fused)
        reuse_draws_in_forward(forward)
        return forward, backward

    return partition


# aot_autograd (torch 2.14) compiles generated wrapper source for the whole graph; on ResNet-1001
# Python's compiler exceeds the default recursion limit on it.
_DEEP_MODEL_RECURSION = 20_000


@contextlib.contextmanager
def _recursion_limit(limit: int):
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(max(previous, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, planner: Planner, *,
            compile: bool = False) -> tuple[CapturedStep, Any]:
    """Trace, plan and split one training step; returns the step and the output spec.

    The graphs run eagerly as boxed fx code, or, with ``compile``, through inductor."""
    with paused():  # memplan.heap says why
        return _capture(model, args, kwargs, planner, compile=compile)


def _capture(model: torch.nn.Module, args: tuple, kwargs: dict, planner: Planner, *,
             compile: bool) -> tuple[CapturedStep, Any]:
    gm, out_spec, user_outputs = _flat_module(model, args, kwargs)
    flat_inputs = pytree.tree_leaves((args, kwargs))
    result: dict[str, Any] = {}
    device = device_of(model, flat_inputs)
    partition = make_partition(
        planner, result, device=device, user_outputs=user_outputs,
        param_count=len(list(gm.named_parameters(remove_duplicate=False))),
        buffer_count=len(list(gm.named_buffers(remove_duplicate=False))),
        model=model, flat_inputs=flat_inputs, eager=not compile,
        written_in_place=_written_in_place(gm))
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in flat_inputs]
    compiled: list[fx.GraphModule] = []
    on_cudnn: set[str] = set()  # the BatchNorms the forward runs on cuDNN, and their outputs

    def compile_one(graph_module: fx.GraphModule, _inputs: Any) -> Callable[..., Any]:
        compiled.append(graph_module)
        return boxed(graph_module)

    def compile_forward(graph_module: fx.GraphModule, inputs: Any) -> Callable[..., Any]:
        update_buffers_in_place(graph_module, [n.name for n in result["graph"].nodes if n.mutated])
        use_cudnn_batch_norm(graph_module, on_cudnn)
        offload_in_forward(graph_module, result["program"])
        return compile_one(graph_module, inputs)

    def compile_backward(graph_module: fx.GraphModule, inputs: Any) -> Callable[..., Any]:
        fetch_in_backward(graph_module, result["program"])  # steps as planned
        recompute_without_running_stats(graph_module)
        use_cudnn_batch_norm(graph_module, on_cudnn)
        return compile_one(graph_module, inputs)

    # Lazy graph modules write their Python code only when it is run or read: most of the
    # graphs made on the way (the joint's, the partition's) never are.
    with _recursion_limit(_DEEP_MODEL_RECURSION), _use_lazy_graph_module(True):
        if compile:
            run = compile_with_inductor(
                gm, fake_inputs, partition,
                rewrite_forward=lambda g: offload_in_forward(g, result["program"]),
                rewrite_backward=lambda g: fetch_in_backward(g, result["program"]))
        else:
            run = aot_module_simplified(gm, fake_inputs, fw_compiler=compile_forward,
                                        bw_compiler=compile_backward, inference_compiler=compile_one,
                                        partition_fn=partition)
    if "graph" not in result:
        raise CaptureError(
            f"{type(model).__name__}'s step has no backward: no parameter or input requires a "
            "gradient, so there is nothing to plan. Call the model directly.")
    return CapturedStep(run=run, graph=result["graph"], program=result["program"],
                        fx_joint=result["joint"], fx_compiled=compiled), out_spec
