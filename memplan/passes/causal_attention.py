"""Give attention a causal flag where the traced graph spells the causal mask out.

Hugging Face models build no mask in eager mode and call ``scaled_dot_product_attention`` with
``is_causal=True``; under tracing (and for fake tensors) they build the causal mask as a tensor,
which reaches the memory-efficient kernel as an additive bias. On an H200 that kernel then took
37 ms of GPT-2 medium's forward instead of eager's 19 ms (``bench/results/offload_h200.md``).
Where a bias depends on no input of the step (it is made from shapes alone) and is, evaluated,
the causal mask of a square attention (0 on and below the diagonal, a masked value above it, in
every batch and head), this pass calls the kernel with no bias and ``is_causal=True``, in the
forward and in the backward that reads it: the same attention, computed as eager computes
Hugging Face's. A model that passes such a mask itself in eager gets the flagged kernel too,
whose rounding may differ from the masked one's. (Which call eager makes cannot be asked of the
model without running it: on fake tensors Hugging Face builds the mask, and on meta tensors it
branches on values.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten
_FORWARD = aten._scaled_dot_product_efficient_attention.default
_BACKWARD = aten._scaled_dot_product_efficient_attention_backward.default


def use_causal_attention(joint: fx.GraphModule) -> None:
    """Rewrite ``joint`` in place; call it outside fake mode (it evaluates the masks)."""
    attentions = joint.graph.find_nodes(op="call_function", target=_FORWARD)
    causal: dict[fx.Node, bool] = {}
    rewrite = []
    for node in attentions:
        bias = _argument(node, 3, "attn_bias")
        if not isinstance(bias, fx.Node) or _argument(node, 6, "is_causal", False):
            continue
        if bias not in causal:
            causal[bias] = _is_causal_mask(joint, bias)
        if causal[bias]:
            rewrite.append(node)
    if not rewrite:
        return
    for node in rewrite:
        query, key, value, bias = node.args[:4]
        node.args = (query, key, value, None, _argument(node, 4, "compute_log_sumexp"),
                     _argument(node, 5, "dropout_p", 0.0), True)
        node.kwargs = {k: v for k, v in node.kwargs.items() if k == "scale"}
        for backward in list(bias.users):
            if backward.target is _BACKWARD and backward.args[1:4] == (query, key, value):
                mask = list(backward.args[10])
                backward.args = (*backward.args[:4], None, *backward.args[5:10],
                                 [*mask[:3], False], True)
                backward.kwargs = {k: v for k, v in backward.kwargs.items() if k == "scale"}
    _erase_unused(joint.graph, [bias for bias, is_causal in causal.items() if is_causal])


def _argument(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase ``nodes`` and their ancestors where nothing else reads them."""
    stack, erased = list(nodes), set()
    while stack:
        node = stack.pop()
        if node in erased or node.users:
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        stack.extend(inputs)


def _is_causal_mask(joint: fx.GraphModule, bias: fx.Node) -> bool:
    value = _evaluate(joint, bias)
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[-1] != value.shape[-2]:
        return False
    # One slice of each broadcast dimension: an expanded mask is compared without being copied.
    value = value[tuple(slice(0, 1) if value.stride(d) == 0 else slice(None)
                        for d in range(value.dim() - 2))]
    size = value.shape[-1]
    lower = torch.ones(size, size, dtype=torch.bool, device=value.device).tril()
    if value.dtype is torch.bool:
        return bool((value == lower).all())
    masked = torch.isneginf(value) | (value == torch.finfo(value.dtype).min)
    return bool(((value == 0) == lower).all() and (masked == ~lower).all())


def _evaluate(joint: fx.GraphModule, node: fx.Node) -> Any:
    """``node``'s value if it depends on no input and draws no random number; else None."""
    needed: dict[fx.Node, None] = {}
    stack = [node]
    while stack:
        current = stack.pop()
        if current in needed:
            continue
        if current.op != "call_function" or _nondeterministic(current) or _uninitialized(current):
            return None
        needed[current] = None
        stack.extend(current.all_input_nodes)
    order = {n: i for i, n in enumerate(joint.graph.nodes)}
    values: dict[fx.Node, Any] = {}
    for current in sorted(needed, key=order.__getitem__):
        args, kwargs = fx.node.map_arg((current.args, current.kwargs), values.__getitem__)
        values[current] = current.target(*args, **kwargs)
    return values[node]


def _uninitialized(node: fx.Node) -> bool:
    packet = getattr(node.target, "overloadpacket", None)
    return getattr(packet, "__name__", "") in ("empty", "empty_like", "empty_strided", "empty_permuted",
                                               "new_empty", "new_empty_strided")


def _nondeterministic(node: fx.Node) -> bool:
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags
