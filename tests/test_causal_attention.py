"""Attention whose traced bias is the causal mask runs as eager's does: no bias, causal flag.

The memory-efficient kernel needs a GPU, so the graphs here are built by hand and only rewritten;
``bench/diag/forward_ops.py`` profiles the rewritten step on a GPU.
"""

import operator

import pytest
import torch
import torch.fx as fx

from memplan.passes.causal_attention import use_causal_attention

aten = torch.ops.aten
SIZE = 6


def attention_step(make_mask, keywords: bool = False) -> fx.GraphModule:
    """Forward and backward of one attention whose bias ``make_mask(graph, query)`` builds;
    with ``keywords``, the forward's optional arguments are passed by name."""
    graph = fx.Graph()
    query, key, value, grad = (graph.placeholder(name) for name in ("q", "k", "v", "grad"))
    bias = make_mask(graph, query)
    attention = graph.call_function(
        aten._scaled_dot_product_efficient_attention.default,
        *(((query, key, value, bias, True), {"dropout_p": 0.1, "is_causal": False, "scale": 0.5})
          if keywords else ((query, key, value, bias, True, 0.1),)))
    out, lse, seed, offset = (graph.call_function(operator.getitem, (attention, i)) for i in range(4))
    backward = graph.call_function(
        aten._scaled_dot_product_efficient_attention_backward.default,
        (grad, query, key, value, bias, out, lse, seed, offset, 0.1, [True, True, True, False]))
    grads = [graph.call_function(operator.getitem, (backward, i)) for i in range(3)]
    graph.output((out, *grads))
    return fx.GraphModule(torch.nn.Module(), graph)


def causal_from_positions(graph, _query, masked=float("-inf"), upper=False, shift=0):
    positions = graph.call_function(aten.arange.default, (SIZE,), {"device": torch.device("cpu")})
    rows = graph.call_function(aten.unsqueeze.default, (positions, 1))
    columns = graph.call_function(aten.unsqueeze.default, (positions, 0))
    if shift:
        columns = graph.call_function(aten.sub.Tensor, (columns, shift))
    allowed = graph.call_function(aten.ge.Tensor if upper else aten.le.Tensor, (columns, rows))
    zeros = graph.call_function(aten.zeros.default, ([SIZE, SIZE],), {"device": torch.device("cpu")})
    bias = graph.call_function(aten.masked_fill.Scalar,
                               (zeros, graph.call_function(aten.logical_not.default, (allowed,)), masked))
    return graph.call_function(aten.expand.default, (bias, [2, 3, SIZE, SIZE]))


def attention_calls(gm):
    forward, = gm.graph.find_nodes(op="call_function",
                                   target=aten._scaled_dot_product_efficient_attention.default)
    backward, = gm.graph.find_nodes(
        op="call_function", target=aten._scaled_dot_product_efficient_attention_backward.default)
    return forward, backward


@pytest.mark.parametrize("masked, keywords", [(float("-inf"), False),
                                              (torch.finfo(torch.float32).min, False),
                                              (float("-inf"), True)])
def test_a_causal_bias_becomes_the_causal_flag(masked, keywords):
    gm = attention_step(lambda graph, query: causal_from_positions(graph, query, masked), keywords)
    use_causal_attention(gm)
    forward, backward = attention_calls(gm)
    assert forward.args == (*forward.args[:3], None, True, 0.1, True)
    assert forward.kwargs == ({"scale": 0.5} if keywords else {})
    assert backward.args[4] is None and backward.args[10:] == ([True, True, True, False], True)
    assert not gm.graph.find_nodes(op="call_function", target=aten.arange.default)  # mask gone
    gm.graph.lint()


@pytest.mark.parametrize("make_mask", [
    lambda graph, query: causal_from_positions(graph, query, upper=True),  # anti-causal
    lambda graph, query: causal_from_positions(graph, query, shift=1),  # one diagonal off
    lambda graph, query: causal_from_positions(graph, query, masked=-1e4),  # a soft mask
    lambda graph, query: graph.call_function(aten.zeros_like.default, (query,)),  # reads an input
    lambda graph, query: graph.call_function(
        aten.expand.default, (graph.call_function(aten.zeros.default, ([SIZE, SIZE],)),
                              [2, 3, SIZE, SIZE])),  # no mask at all
    lambda graph, query: graph.call_function(
        aten.expand.default, (graph.call_function(aten.empty.memory_format, ([SIZE, SIZE],)),
                              [2, 3, SIZE, SIZE])),  # uninitialised memory
])
def test_other_biases_are_left_alone(make_mask):
    gm = attention_step(make_mask)
    before = [tuple(node.args) for node in attention_calls(gm)]
    use_causal_attention(gm)
    assert [tuple(node.args) for node in attention_calls(gm)] == before
