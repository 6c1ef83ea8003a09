"""The rematerialization problem: a DAG over plain lists, loaded from node-link JSON.

Two external formats are read (see ../shared/data/graphs/README.md): Checkmate training graphs
(`cost_cpu` → time, `cost_ram` → bytes) and random layered graphs (`duration` → time,
`out_cost` → bytes; `param_cost` is ignored because parameters are resident in every plan).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import networkx as nx

_FORMATS = (("cost_cpu", "cost_ram"), ("duration", "out_cost"))


@dataclasses.dataclass(frozen=True)
class Graph:
    """Nodes in a topological order; `preds[i]` are indices of node i's inputs (all < i).

    `time[i]` is the cost of computing node i once; `bytes[i]` the size of its output.
    """

    names: tuple[str, ...]
    time: tuple[int | float, ...]
    bytes: tuple[int, ...]
    preds: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        n = len(self.names)
        if not (len(self.time) == len(self.bytes) == len(self.preds) == n):
            raise ValueError("names, time, bytes and preds must have the same length")
        if len(set(self.names)) != n:
            raise ValueError("node names must be unique")
        for i, (t, b, ps) in enumerate(zip(self.time, self.bytes, self.preds)):
            if not isinstance(b, int) or isinstance(b, bool) or b < 0:
                raise ValueError(f"node {self.names[i]!r}: bytes must be a non-negative int, got {b!r}")
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not t >= 0:
                raise ValueError(f"node {self.names[i]!r}: time must be a non-negative number, got {t!r}")
            if any(not 0 <= p < i for p in ps) or len(set(ps)) != len(ps):
                raise ValueError(
                    f"node {self.names[i]!r}: predecessors {ps} must be distinct indices of earlier nodes"
                )

    def __len__(self) -> int:
        return len(self.names)

    @property
    def succs(self) -> tuple[tuple[int, ...], ...]:
        """Successor indices per node, ascending."""
        out: list[list[int]] = [[] for _ in self.names]
        for i, ps in enumerate(self.preds):
            for p in ps:
                out[p].append(i)
        return tuple(tuple(s) for s in out)


def make_graph(
    names: Sequence[str],
    time: Sequence[int | float],
    bytes_: Sequence[int],
    edges: Sequence[tuple[str, str]],
) -> Graph:
    """Build a Graph from edges `(src, dst)` by name; nodes are sorted topologically.

    Ties are broken by the position in `names` (lexicographical topological sort), so the order is
    deterministic.
    """
    if len(names) != len(time) or len(names) != len(bytes_):
        raise ValueError("names, time and bytes_ must have the same length")
    g = nx.DiGraph()
    for i, name in enumerate(names):
        g.add_node(name, pos=i)
    for src, dst in edges:
        if src not in g or dst not in g:
            raise ValueError(f"edge ({src!r}, {dst!r}) names an unknown node")
        g.add_edge(src, dst)
    return _from_nx(g, [str(n) for n in names], list(time), list(bytes_), order=None)


def load_graph(path: str | Path) -> Graph:
    """Read a networkx node-link JSON file in the Checkmate or random-layered format."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "nodes" not in data:
        raise ValueError(f"{path}: not a node-link JSON graph (no 'nodes')")
    edges_key = "links" if "links" in data else "edges"
    edge_list = data.get(edges_key, [])
    src_key, dst_key = ("source", "target")
    if edge_list and "source" not in edge_list[0]:
        src_key, dst_key = ("0", "1")  # random layered graphs store edges as {"0": u, "1": v}
    id_key = "id" if data["nodes"] and "id" in data["nodes"][0] else "name"
    g = nx.node_link_graph(
        data, directed=True, multigraph=False, edges=edges_key, source=src_key, target=dst_key, name=id_key
    )
    time_key, bytes_key = _detect_format(data["nodes"], path)
    ids = [node[id_key] for node in data["nodes"]]
    for pos, node_id in enumerate(ids):
        g.nodes[node_id]["pos"] = pos
    names = [str(data["nodes"][i].get("name", ids[i])) for i in range(len(ids))]
    times = [data["nodes"][i][time_key] for i in range(len(ids))]
    sizes = [data["nodes"][i][bytes_key] for i in range(len(ids))]
    order = data.get("graph", {}).get("order")
    return _from_nx(g, names, times, sizes, order=order, ids=ids)


def _detect_format(nodes: list[dict], path: str | Path) -> tuple[str, str]:
    for time_key, bytes_key in _FORMATS:
        if all(time_key in n and bytes_key in n for n in nodes):
            return time_key, bytes_key
    raise ValueError(f"{path}: nodes need ('cost_cpu', 'cost_ram') or ('duration', 'out_cost') fields")


def _from_nx(g, names, times, sizes, *, order, ids=None) -> Graph:
    """Number nodes by the stored order if it is a valid topological order, else lexicographically."""
    ids = list(names) if ids is None else ids
    if not nx.is_directed_acyclic_graph(g):
        raise ValueError("graph has a cycle")
    if order is None or not _is_topological(g, order):
        order = list(nx.lexicographical_topological_sort(g, key=lambda n: g.nodes[n]["pos"]))
    pos_of = {node_id: g.nodes[node_id]["pos"] for node_id in ids}
    index = {node_id: i for i, node_id in enumerate(order)}
    return Graph(
        names=tuple(names[pos_of[v]] for v in order),
        time=tuple(times[pos_of[v]] for v in order),
        bytes=tuple(sizes[pos_of[v]] for v in order),
        preds=tuple(tuple(sorted(index[u] for u in g.predecessors(v))) for v in order),
    )


def _is_topological(g, order) -> bool:
    if len(order) != g.number_of_nodes() or set(order) != set(g.nodes):
        return False
    index = {v: i for i, v in enumerate(order)}
    return all(index[u] < index[v] for u, v in g.edges)
