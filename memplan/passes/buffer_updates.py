"""Update BatchNorm's buffers in place, as eager PyTorch does, instead of copying new values back.

The functional forward graph computes a training BatchNorm's new running statistics into two
clones of the buffers and counts batches with an out-of-place add; aot_autograd's runtime then
copies each new value back into its buffer, one Python call each. That is five device copies
and three Python calls per BatchNorm per step that eager does not make, and on a fast GPU a step
of many small layers is bound by such calls. Where a buffer is read by nothing but its own update, this pass makes
the update in place and hands the runtime the buffer itself, whose copy onto itself is a no-op.
The values are bitwise the same: the functional BatchNorm is the in-place one run on clones.

A BatchNorm recomputed in the backward graph needs its output and batch statistics only; there
it runs without running statistics (``no_stats``), so it neither clones nor updates them.
"""

from __future__ import annotations

import collections
import operator

import torch
import torch.fx as fx

aten = torch.ops.aten
_FUNCTIONAL_BATCH_NORM = aten._native_batch_norm_legit_functional.default
_BATCH_NORM_BACKWARD = aten.native_batch_norm_backward.default


def free_backward_of_running_stats(joint: fx.GraphModule) -> None:
    """A training BatchNorm's backward takes the new running statistics and ignores them; give
    it none, so that they are not saved for backward and can be written in place."""
    for node in joint.graph.find_nodes(op="call_function", target=_BATCH_NORM_BACKWARD):
        if node.args[7]:
            node.args = (*node.args[:3], None, None, *node.args[5:])


def update_buffers_in_place(forward: fx.GraphModule, mutated_inputs: list[str]) -> None:
    """Rewrite the forward graph; ``mutated_inputs`` names, in input order, the placeholders
    whose new values the graph returns first."""
    output = forward.graph.output_node()
    returned = output.args[0]
    occurrences = collections.Counter(returned)
    placeholders = {n.name: n for n in forward.graph.find_nodes(op="placeholder")}
    slot_of = {}  # a write-back value -> the placeholder it is written into
    for name, value in zip(mutated_inputs, returned[:len(mutated_inputs)]):
        if isinstance(value, fx.Node) and len(value.users) == 1 and occurrences[value] == 1:
            slot_of[value] = placeholders[name]
    returned_instead: dict[fx.Node, fx.Node] = {}  # the write-back value -> the updated buffer
    for node in list(forward.graph.nodes):
        if node.target is _FUNCTIONAL_BATCH_NORM and node.args[5]:
            updates = [_getitem(node, index) for index in (3, 4)]
            buffers = node.args[3:5]
            if all(_only_update(buffer, update, node, slot_of, output)
                   for buffer, update in zip(buffers, updates)):
                node.target = aten._native_batch_norm_legit.default
                returned_instead.update(zip(updates, buffers))
        elif node.target is aten.add.Tensor and _only_update(node.args[0], node, node, slot_of, output):
            node.target = aten.add_.Tensor  # num_batches_tracked += 1
            returned_instead[node] = node.args[0]
    # One rewrite of the output: replacing uses one by one rescans it each time.
    output.args = (type(returned)(returned_instead.get(v, v) for v in returned), *output.args[1:])
    for update in returned_instead:
        if update.target is operator.getitem:
            forward.graph.erase_node(update)
    forward.recompile()


def recompute_without_running_stats(backward: fx.GraphModule) -> None:
    """Rewrite the training BatchNorms of the backward graph, whose new running statistics
    nothing reads, to compute batch statistics only."""
    for node in backward.graph.find_nodes(op="call_function", target=_FUNCTIONAL_BATCH_NORM):
        if node.args[5] and _getitem(node, 3) is None and _getitem(node, 4) is None:
            source, weight, bias, _mean, _var, training, momentum, eps = node.args
            node.target = aten._native_batch_norm_legit.no_stats
            node.args = (source, weight, bias, training, momentum, eps)
    backward.recompile()


def _getitem(node: fx.Node, index: int) -> fx.Node | None:
    return next((u for u in node.users if u.target is operator.getitem and u.args[1] == index), None)


def _only_update(buffer: object, update: fx.Node | None, op: fx.Node, slot_of: dict,
                 output: fx.Node) -> bool:
    """``update`` is written back into ``buffer`` and used for nothing else, and nothing but
    ``op`` and the graph's outputs (a saved state input) reads the buffer."""
    return (update is not None and slot_of.get(update) is buffer
            and set(buffer.users) <= {op, output})
