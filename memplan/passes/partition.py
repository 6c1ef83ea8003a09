"""Split the joint graph into the forward and backward graphs a Program describes.

``_extract_fwd_bwd_modules`` gives the two graphs the signatures aot_autograd's runtime expects
(forward: outputs, then saved values; backward: saved values, then tangents). The backward body
is then rebuilt in the Program's order, one node per step, so that recomputation sits just
before its first use and a value recomputed twice is computed twice. The result is checked
against the Program: the simulator's prediction is only a promise if the graphs are the same.
"""

from __future__ import annotations

import torch.fx as fx
from torch._functorch.partitioners import _extract_fwd_bwd_modules
from torch.fx._lazy_graph_module import _make_graph_module

from memplan.errors import InternalError
from memplan.graph import JointGraph
from memplan.program import Program


def split(joint: fx.GraphModule, graph: JointGraph, program: Program,
          num_fwd_outputs: int) -> tuple[fx.GraphModule, fx.GraphModule]:
    by_name = {node.name: node for node in joint.graph.nodes}
    saved = [by_name[name] for name in program.saved]
    for name in program.saved:
        if graph[name].mutated:  # read only as a state input; see capture._state_inputs
            by_name[name].meta["saved_tensor_with_no_vc_check"] = True
    forward, backward = _extract_fwd_bwd_modules(
        joint, saved_values=saved, saved_sym_nodes=[], num_fwd_outputs=num_fwd_outputs)
    _check_forward(forward, program)
    return forward, _rebuild_backward(backward, program)


def _check_forward(forward: fx.GraphModule, program: Program) -> None:
    computed = tuple(n.name for n in forward.graph.nodes if n.op == "call_function")
    if computed != program.forward:
        extra, missing = set(computed) - set(program.forward), set(program.forward) - set(computed)
        raise InternalError(f"forward graph differs from the program: it also runs "
                            f"{sorted(extra)[:10]} and lacks {sorted(missing)[:10]}")


def _rebuild_backward(backward: fx.GraphModule, program: Program) -> fx.GraphModule:
    """Emit the backward body in program order; every use reads the latest computation.

    Nodes the extraction kept but the program does not run are left out: the extraction keeps
    random ops whose input backward happens to receive, since dead-code elimination treats
    them as impure, and running them would draw from the RNG a second time.
    """
    old = {node.name: node for node in backward.graph.nodes}
    computed = {n.name for n in backward.graph.nodes if n.op == "call_function"}
    if not computed >= set(program.backward):
        missing = set(program.backward) - computed
        raise InternalError(f"backward graph lacks nodes of the program: {sorted(missing)[:10]}")
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in backward.graph.find_nodes(op="placeholder"):
        env[node] = graph.node_copy(node, env.__getitem__)
    for name in program.backward:
        env[old[name]] = graph.node_copy(old[name], env.__getitem__)
    graph.node_copy(backward.graph.output_node(), env.__getitem__)
    graph.lint()
    return _make_graph_module(backward, graph)  # lazy where capture asks for it
