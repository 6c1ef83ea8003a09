"""Dropout whose output and mask can be recomputed, and are the ones eager draws.

A random op is never recomputed as it is (it would draw new numbers), so everything it returns
would be saved: for ``native_dropout`` the mask *and* the output, and the output is as large as
the input (an attention dropout holds batch × heads × length² values per layer). Two rewrites:

- The output is the input times the mask times 1/(1-p), which is exactly what
  ``native_dropout_backward`` computes from them (the mask is 0 or 1, so the product is the same
  float in any order). Every use of the output reads that product, so the output can be freed
  and recomputed from the mask like any other value.
- The mask itself is drawn by ``draw``, which also returns the generator's state before the
  draw (a few bytes), and every use reads ``replay`` of that state: the same draw again, with
  the generator left as it was (what ``torch.utils.checkpoint`` does when it preserves RNG
  state). That replay is an ordinary value the plan may keep or recompute. In the forward it is
  the draw's own result (``reuse_draws_in_forward``), so the forward draws once and replays
  nothing.

Both rewrites serve the compiled path too: ``draw`` and ``replay`` are custom ops, which
inductor calls as they are, and for inductor the product is written as the multiplications it
would decompose ``native_dropout_backward`` into.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

aten = torch.ops.aten


def _getitem(node: fx.Node, index: int) -> fx.Node | None:
    return next((u for u in node.users if u.target is operator.getitem and u.args[1] == index), None)


def recompute_dropout_from_mask(joint: fx.GraphModule, *, decomposed: bool = False) -> int:
    """Rewrite training dropouts in place; returns how many were rewritten.

    ``decomposed``: the product as inductor's decomposition of ``native_dropout_backward``
    (input times the mask times the scale, the same floats), for graphs inductor compiles."""
    rewritten = 0
    for node in list(joint.graph.nodes):
        if node.target is not aten.native_dropout.default or not node.args[2]:
            continue
        output, mask = _getitem(node, 0), _getitem(node, 1)
        if output is None or mask is None or not output.users:
            continue
        source, p = node.args[0], node.args[1]
        if decomposed:
            dtype = output.meta["val"].dtype
            with joint.graph.inserting_after(mask):
                as_float = joint.graph.call_function(
                    torch.ops.prims.convert_element_type.default, (mask, dtype))
            with joint.graph.inserting_after(as_float):
                scaled = joint.graph.call_function(aten.mul.Tensor, (as_float, 1.0 / (1.0 - p)))
            with joint.graph.inserting_after(scaled):
                product = joint.graph.call_function(aten.mul.Tensor, (source, scaled))
            as_float.meta["val"] = mask.meta["val"].to(dtype)
            scaled.meta["val"] = as_float.meta["val"].clone()
        else:
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
    return rewritten


def replay_dropout_masks(joint: fx.GraphModule) -> None:
    """Draw each training dropout with its generator state saved, and read it as a replay."""
    for node in list(joint.graph.nodes):
        if node.target is not aten.native_dropout.default or not node.args[2]:
            continue
        source, p = node.args[:2]
        output, mask = node.meta["val"]
        with joint.graph.inserting_before(node):
            drawn = joint.graph.call_function(draw, (source, p))
            state = joint.graph.call_function(operator.getitem, (drawn, 0))
            replayed = joint.graph.call_function(replay, (state, source, p))
        state_value = output.fake_mode.from_tensor(_generator_state(output.device),
                                                   static_shapes=True)  # no symbol to guard
        drawn.meta.update(node.meta, val=(state_value, _like(output), _like(mask)))
        state.meta.update(node.meta, val=state_value)
        replayed.meta.update(node.meta, val=(_like(output), _like(mask)))
        node.replace_all_uses_with(replayed)
        joint.graph.erase_node(node)
    joint.graph.lint()


def reuse_draws_in_forward(forward: fx.GraphModule) -> None:
    """In the forward graph, a replay right after its draw is the draw's own result."""
    replays = forward.graph.find_nodes(op="call_function", target=replay)
    for replayed in replays:
        drawn = replayed.args[0].args[0]
        for result in list(replayed.users):  # getitem 0 (output) or 1 (mask)
            result.args = (drawn, result.args[1] + 1)
        forward.graph.erase_node(replayed)
    if replays:
        forward.recompile()


@torch.library.custom_op("memplan::dropout_draw", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def _draw(input: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training dropout; also returns the generator state it started from."""
    state = _generator_state(input.device)
    return (state, *aten.native_dropout.default(input, p, True))


@torch.library.custom_op("memplan::dropout_replay", mutates_args=())  # a function of its state
def _replay(state: torch.Tensor, input: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Training dropout drawn from a saved generator state, leaving the generator as it was."""
    current = _generator_state(input.device)
    _set_generator_state(input.device, state)
    try:
        return aten.native_dropout.default(input, p, True)
    finally:
        _set_generator_state(input.device, current)


@_draw.register_fake
def _(input: torch.Tensor, p: float):
    state = torch.empty(_generator_state(input.device).shape, dtype=torch.uint8)
    return state, torch.empty_like(input), torch.empty_like(input, dtype=torch.bool)


@_replay.register_fake
def _(state: torch.Tensor, input: torch.Tensor, p: float):
    return torch.empty_like(input), torch.empty_like(input, dtype=torch.bool)


# Custom ops, so that inductor calls them as they are, drawing from PyTorch's own generator.
draw = torch.ops.memplan.dropout_draw.default
replay = torch.ops.memplan.dropout_replay.default


def sets_generator_state(op: object) -> bool:
    """A replay sets the generator from its argument: it cannot run on made-up values (the cost
    models leave it to the analytic estimate)."""
    return op is replay


def _generator_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_generator_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _like(value: FakeTensor) -> FakeTensor:
    """A fake tensor of the same shape and strides with a storage of its own."""
    return value.new_empty_strided(value.shape, value.stride())
