"""Make what backward reads of a forward value small, as inductor's own partitioner does.

Two rewrites of the joint graph that inductor compiles. Without them a plan chooses only among
whole forward values: it keeps a ReLU's output (or recomputes it, convolution and all) where
backward needs only the output's sign, or only its shape.

- Pooling's backward reads its input for its shape alone: inductor's lowering loads the
  gradient (and max-pooling's indices), and takes the input's size (max-pooling also looks at its
  strides, and at the gradient's, to choose a layout). It is given a
  stand-in of that size which holds one number (``read_shapes_only``). Inductor would not hold
  the input for it (``memplan.inductor._pass_shapes_not_values``), but the plan would still
  keep or recompute it: a DenseNet transition's convolution output, a VGG block's last ReLU.
- A backward computation that reads one forward value and nothing else, when it is all that
  backward reads of that value and its result is smaller (a ReLU's mask: one byte per element of
  a four-byte value), moves into the forward (``compute_masks_in_forward``). It becomes a forward
  value like any other: the plan may save the mask in place of the value, or compute it in
  backward as before.
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten

_BACKWARD_TAG = "partitioner_tag"  # aot_autograd's mark on nodes the joint trace made for backward


def tangent_dependent(graph: fx.Graph) -> set[fx.Node]:
    """The tangents and every node that reads one, directly or not."""
    dependent: set[fx.Node] = set()
    for node in graph.nodes:
        if (node.op == "placeholder" and node.name.startswith("tangents")) or any(
                i in dependent for i in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _is_backward(node: fx.Node) -> bool:
    return node.meta.get(_BACKWARD_TAG) == "is_backward"


def _nbytes(node: fx.Node) -> int:
    value = node.meta["val"]
    return value.untyped_storage().nbytes() if isinstance(value, torch.Tensor) else 0


def read_shapes_only(joint: fx.GraphModule) -> int:
    """Give each pooling backward a one-number stand-in of its input; returns how many."""
    rewritten = 0
    graph = joint.graph
    for node in [*graph.find_nodes(op="call_function",
                                   target=aten.max_pool2d_with_indices_backward.default),
                 *graph.find_nodes(op="call_function", target=aten.avg_pool2d_backward.default)]:
        if not _lowered_without_its_input(node):
            continue
        source = node.args[1]
        value = source.meta["val"]
        with graph.inserting_before(node):
            number = graph.call_function(aten.full.default, ([], 0),
                                         {"dtype": value.dtype, "device": value.device})
            stand_in = graph.call_function(aten.expand.default, (number, list(value.shape)))
        with value.fake_mode:
            number.meta["val"] = torch.full([], 0, dtype=value.dtype, device=value.device)
            stand_in.meta["val"] = number.meta["val"].expand(value.shape)
        for new in (number, stand_in):
            new.meta[_BACKWARD_TAG] = "is_backward"
        node.replace_input_with(source, stand_in)
        rewritten += 1
    return rewritten


def _lowered_without_its_input(node: fx.Node) -> bool:
    """Inductor's lowering of this pooling backward takes only its input's size: not a dilated
    max-pooling, nor one whose windows overlap an output element more than 25 times, which it
    leaves to ATen's kernels, whose output takes the input's memory format."""
    kernel = node.args[2]
    stride = node.args[3] or kernel
    if node.target is aten.max_pool2d_with_indices_backward.default:
        dilation = node.args[5]
        if any(d != 1 for d in ([dilation] if isinstance(dilation, int) else dilation)):
            return False
    return _windows(kernel[0], stride[0]) * _windows(kernel[-1], stride[-1]) <= 25


def _windows(kernel: int, stride: int) -> int:
    """How many pooling windows cover one input element at most, along one dimension, as
    inductor counts them."""
    return max(max(h // stride - max(0, (h - kernel) // stride), 1) for h in range(2 * kernel))


def compute_masks_in_forward(joint: fx.GraphModule) -> int:
    """Move small computations of one forward value from backward into the forward, after the
    value (see the module's docstring); returns how many values they read."""
    graph = joint.graph
    dependent = tangent_dependent(graph)
    order = {node: i for i, node in enumerate(graph.nodes)}
    moved = 0
    for value in list(graph.nodes):
        if (value.op != "call_function" or _is_view(value) or _is_backward(value)
                or value in dependent):
            continue
        chain = _backward_computation_of(value, dependent)
        if not chain or sum(_nbytes(n) for n in chain if not _is_view(n)) >= _nbytes(value):
            continue
        read = {i for n in chain for i in n.all_input_nodes if i not in chain}
        anchor = max(read, key=order.__getitem__)
        for node in sorted(chain, key=order.__getitem__):  # each after what it reads
            anchor.append(node)
            anchor = node
            del node.meta[_BACKWARD_TAG]
        moved += 1
    graph.lint()
    return moved


def _is_view(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target.is_view


def _backward_computation_of(value: fx.Node, tangent_dependent: set[fx.Node]) -> set[fx.Node]:
    """The backward nodes that read ``value`` or its views, if each of them is elementwise or a
    view, depends on no tangent and reads nothing else; otherwise nothing."""
    views: set[fx.Node] = set()
    readers: set[fx.Node] = set()
    stack = list(value.users)
    while stack:
        node = stack.pop()
        if _is_backward(node) or node in tangent_dependent:
            readers.add(node)
        if _is_view(node) and node not in views:
            views.add(node)
            stack.extend(node.users)
    for node in readers:
        if node in tangent_dependent or not (
                _is_view(node) or torch.Tag.pointwise in getattr(node.target, "tags", ())):
            return set()
        if any(i is not value and i not in views and i not in readers
               for i in node.all_input_nodes):
            return set()
        if any(not (_is_backward(u) or u in tangent_dependent) for u in node.users):
            return set()  # a forward value reads it: it stays where it is
    return readers
