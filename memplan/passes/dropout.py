"""Keep dropout's mask, recompute its output.

A random op is never recomputed (it would draw new numbers), so everything it returns is saved:
for ``native_dropout`` that is the mask *and* the output, and the output is as large as the
input (an attention dropout holds batch × heads × length² values per layer). The output is
the input times the mask times 1/(1-p), which is exactly what ``native_dropout_backward``
computes from them (the mask is 0 or 1, so the product is the same float in any order). This
pass rewrites every use of the output to that product, so that only the mask (one byte per
value) must be kept and the output can be freed and recomputed like any other value.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten


def _getitem(node: fx.Node, index: int) -> fx.Node | None:
    return next((u for u in node.users if u.target is operator.getitem and u.args[1] == index), None)


def recompute_dropout_from_mask(joint: fx.GraphModule) -> int:
    """Rewrite training dropouts in place; returns how many were rewritten."""
    rewritten = 0
    for node in list(joint.graph.nodes):
        if node.target is not aten.native_dropout.default or not node.args[2]:
            continue
        output, mask = _getitem(node, 0), _getitem(node, 1)
        if output is None or mask is None or not output.users:
            continue
        source, p = node.args[0], node.args[1]
        with joint.graph.inserting_after(mask):
            product = joint.graph.call_function(aten.native_dropout_backward.default,
                                                (source, mask, 1.0 / (1.0 - p)))
        # The product takes over the output's value (views of it refer to its storage); the
        # dropout's own, now unused, output gets a storage of its own.
        product.meta = dict(output.meta)
        value, mask_value = node.meta["val"]
        node.meta["val"] = (value.new_empty_strided(value.shape, value.stride()), mask_value)
        output.replace_all_uses_with(product)
        joint.graph.erase_node(output)
        rewritten += 1
    if rewritten:
        joint.graph.lint()
        joint.recompile()
    return rewritten
