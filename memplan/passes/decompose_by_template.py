"""Decompose a repeated op by copying one traced decomposition per distinct signature.

aot_autograd traces every decomposed node through functionalization, the proxy tracer and
FakeTensorMode: 0.6 ms a node on a CPU, 0.9 ms on an H200's host. BatchNorm's forward and
backward decompose into 51 nodes per instance, 79% of ResNet-1001's joint graph, and its
thousand BatchNorms have a handful of signatures. So the joint graph is traced with these ops
whole, and each is replaced by a copy of its decomposition, traced once per signature (op,
tensor layouts, which tensors share storage, the other arguments): the graph is the one a
decomposing trace gives, node for node, with the same metadata. A copy's values are fake
tensors of the template's layouts on the copy's storages, made without dispatching an op.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import make_fx
from torch.multiprocessing.reductions import StorageWeakRef

from memplan.errors import InternalError

log = logging.getLogger(__name__)
aten = torch.ops.aten

# Ops decomposed here rather than during aot_autograd's trace: BatchNorm's, and on CUDA the
# cuDNN BatchNorm that the forward dispatches to (whose decomposition writes the running
# statistics in place, as the trace had it); ReLU's backward and detach (an alias of its
# input), one or more per layer of a CNN (ResNet-1001's trace took 15.7 s instead of 18.7 s
# on a CPU).
TEMPLATED = (aten._native_batch_norm_legit_functional.default,
             aten.native_batch_norm_backward.default,
             aten.cudnn_batch_norm.default, aten.cudnn_batch_norm_backward.default,
             aten.threshold_backward.default, aten.detach.default)

# A decomposition's nodes have the metadata of the op they decompose, but for these.
_OWN = ("val", "tensor_meta")


@dataclass(frozen=True)
class _Layout:
    """A fake tensor's value: its view of the ``storage``-th storage of a copy (the inputs' in
    order, then those the decomposition allocates)."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    device: torch.device
    storage: int


@dataclass(frozen=True)
class _Template:
    graph: fx.Graph
    values: dict[fx.Node, Any]  # each computed node's value, tensors as _Layouts
    allocated: tuple[int, ...]  # the bytes of each storage the decomposition allocates
    returned: tuple[tuple[int, _Layout], ...]  # the op's outputs on storages it allocates


def decompose_by_template(graph: fx.Graph, table: dict[Any, Callable[..., Any]]) -> None:
    """Replace each ``TEMPLATED`` node of ``graph`` by its decomposition under ``table``."""
    templates: dict[tuple, _Template] = {}
    copied = 0
    decomposed: list[fx.Node] = []  # the ops of several outputs
    replaced: dict[fx.Node, fx.Node] = {}  # ops of one output and getitems, by their copies
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in TEMPLATED:
            continue
        inputs = [arg for arg in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(arg, fx.Node)]
        key = _signature(node, inputs)
        if key not in templates:
            templates[key] = _trace(node, inputs, table)
        with graph.inserting_before(node):
            outputs = _copy(graph, templates[key], node, inputs)
        copied += 1
        if isinstance(outputs, fx.Node):  # one tensor: its users read the copy's
            replaced[node] = outputs
            continue
        for user in node.users:
            if user.op != "call_function" or user.target is not operator.getitem:
                raise InternalError(f"{node.format_node()} has a user that is not getitem: {user}")
            replaced[user] = outputs[user.args[1]]
        decomposed.append(node)
    # Replaced at once: node by node, the graph's output (thousands of arguments) is rebuilt
    # for each of the running statistics it returns, 1.2 s on ResNet-1001.
    for user in dict.fromkeys(user for node in replaced for user in node.users):
        user.args, user.kwargs = fx.node.map_arg((user.args, user.kwargs), lambda n: replaced.get(n, n))
    for node in [*replaced, *decomposed]:
        graph.erase_node(node)
    log.info("%d ops decomposed as copies of %d traces", copied, len(templates))


def _signature(node: fx.Node, inputs: list[fx.Node]) -> tuple:
    def describe(arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            value = arg.meta["val"]
            return (tuple(value.shape), value.stride(), value.storage_offset(), value.dtype, value.device)
        return tuple(arg) if isinstance(arg, list) else arg

    storages: dict[StorageWeakRef, int] = {}
    sharing = tuple(storages.setdefault(StorageWeakRef(arg.meta["val"].untyped_storage()), len(storages))
                    for arg in inputs)
    return node.target, pytree.tree_map(describe, (node.args, tuple(sorted(node.kwargs.items())))), sharing


def _trace(node: fx.Node, inputs: list[fx.Node], table: dict[Any, Callable[..., Any]]) -> _Template:
    """The decomposition of ``node``, its tensor arguments as placeholders in ``inputs``' order."""
    def call(*tensors: torch.Tensor) -> Any:
        by_node = dict(zip(inputs, tensors))
        args, kwargs = pytree.tree_map(lambda a: by_node[a] if isinstance(a, fx.Node) else a,
                                       (node.args, node.kwargs))
        return node.target(*args, **kwargs)

    graph = make_fx(call, decomposition_table=table)(*(arg.meta["val"] for arg in inputs)).graph
    storages = {StorageWeakRef(arg.meta["val"].untyped_storage()): i for i, arg in enumerate(inputs)}
    allocated: list[int] = []

    def layout(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        storage = value.untyped_storage()
        index = storages.setdefault(StorageWeakRef(storage), len(inputs) + len(allocated))
        if index == len(inputs) + len(allocated):
            allocated.append(storage.nbytes())
        return _Layout(tuple(value.shape), value.stride(), value.storage_offset(), value.dtype,
                       value.device, index)

    values = {n: pytree.tree_map(layout, n.meta["val"]) for n in graph.nodes if n.op == "call_function"}
    outputs = [values.get(n) for n in _as_list(graph.output_node().args[0])]
    returned = tuple((i, out) for i, out in enumerate(outputs)
                     if isinstance(out, _Layout) and out.storage >= len(inputs))
    return _Template(graph, values, tuple(allocated), returned)


def _as_list(returned: Any) -> list:
    """An op's outputs, one or several, as a list."""
    return list(returned) if isinstance(returned, (tuple, list)) else [returned]


def _copy(graph: fx.Graph, template: _Template, op: fx.Node, inputs: list[fx.Node]) -> Any:
    """Copy ``template`` into ``graph`` at its insertion point; returns its output's node, or
    its outputs' nodes."""
    fake_mode = inputs[0].meta["val"].fake_mode
    with unset_fake_temporarily():
        storages = [arg.meta["val"].untyped_storage() for arg in inputs]
        storages += [torch.empty(size, dtype=torch.uint8, device="meta").untyped_storage()
                     for size in template.allocated]
        for output, layout in template.returned:  # the graph's views of the op's outputs alias these
            traced = _as_list(op.meta["val"])[output]
            if ((tuple(traced.shape), traced.stride(), traced.storage_offset())
                    != (layout.size, layout.stride, layout.offset)):
                raise InternalError(f"{op.target}'s output {output} is {traced.shape} with "
                                    f"strides {traced.stride()}, its decomposition's {layout}")
            storages[layout.storage] = traced.untyped_storage()

    def value(layout: Any) -> Any:
        if isinstance(layout, (tuple, list)):
            return type(layout)(value(item) for item in layout)
        if not isinstance(layout, _Layout):
            return layout
        # Made outside FakeTensorMode: on CUDA the construction allocates a real byte
        # (init_gpu_context), which the mode would intercept.
        with unset_fake_temporarily():
            tensor = torch.empty(0, dtype=layout.dtype, device="meta").set_(
                storages[layout.storage], layout.offset, layout.size, layout.stride)
            return FakeTensor(fake_mode, tensor, layout.device)

    inherited = {key: item for key, item in op.meta.items() if key not in _OWN}
    env: dict[fx.Node, Any] = {}
    placeholders = iter(inputs)
    for node in template.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "output":
            return fx.node.map_arg(node.args[0], env.__getitem__)
        else:
            # Named from the target, as traced nodes are: older fx (the H200's torch 2.11) finds
            # a free name for "mul_3" by counting up from mul_1, 107 s on ResNet-1001 there.
            copy = graph.create_node(node.op, node.target, fx.node.map_arg(node.args, env.__getitem__),
                                     fx.node.map_arg(node.kwargs, env.__getitem__))
            copy.meta = dict(inherited, val=value(template.values[node]))
            if "tensor_meta" in node.meta:
                copy.meta["tensor_meta"] = node.meta["tensor_meta"]
            env[node] = copy
    raise AssertionError("a traced graph ends with an output node")
