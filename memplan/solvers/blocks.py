"""Structurally identical blocks: the repeated layers of a model, found in the joint graph.

A block is the forward nodes of one numbered module instance (``transformer.h.7``,
``layers.27``: the module path up to its last numeric part). Two blocks of the same numbered
container are identical when their nodes, in joint order, have the same ops, relative module
paths, bytes and wiring (an input inside the block by its position there, one outside by its op, or
``primal`` for parameters and inputs).
A solver may then decide for one block and reuse the decision for all the others.
"""

from __future__ import annotations

import re
from collections import defaultdict

from memplan.graph import JointGraph, Phase

_NUMERIC = re.compile(r"^\d+$")


def block_of(module_path: str) -> tuple[str, str] | None:
    """(instance, container) of a module path: ``a.h.7.attn`` -> (``a.h.7``, ``a.h``)."""
    parts = module_path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if _NUMERIC.match(parts[i]):
            return ".".join(parts[:i + 1]), ".".join(parts[:i])
    return None


def _outside(graph: JointGraph, name: str) -> str:
    node = graph[name]
    return node.phase.value if node.phase is Phase.PRIMAL else node.op


def _signature(graph: JointGraph, instance: str, names: list[str]) -> tuple:
    position = {name: i for i, name in enumerate(names)}
    rows = []
    for name in names:
        node = graph[name]
        wiring = tuple(position[i] if i in position else _outside(graph, i) for i in node.inputs)
        nbytes = tuple(graph.storages[s].nbytes for s in node.storages)
        rows.append((node.op, node.module_path[len(instance):], node.is_tensor, nbytes, wiring))
    return tuple(rows)


def representatives(graph: JointGraph) -> dict[str, str]:
    """Forward node -> the corresponding node of the first identical block before it."""
    members: dict[tuple[str, str], list[str]] = defaultdict(list)
    for node in graph.nodes_of(Phase.FORWARD):
        block = block_of(node.module_path)
        if block is not None:
            members[block].append(node.name)
    first: dict[tuple[str, tuple], list[str]] = {}
    out: dict[str, str] = {}
    for (instance, container), names in members.items():
        key = (container, _signature(graph, instance, names))
        if key in first:
            out.update(zip(names, first[key]))
        else:
            first[key] = names
    return out
