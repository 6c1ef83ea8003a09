"""The entry point: `solve(graph, budget_bytes, method=...)` over the registered solvers."""

from __future__ import annotations

import dataclasses
import time

from memplan.remat.graph import Graph
from memplan.remat.registry import SolverConfig, get
from memplan.remat.schedule import Schedule, infeasible

AUTO_FALLBACKS = ("greedy-belady", "greedy-dtr")


def solve(
    graph: Graph,
    budget_bytes: int,
    *,
    method: str = "auto",
    time_limit_s: float = 30.0,
    seed: int = 0,
    workers: int = 2,
    config: SolverConfig | None = None,
) -> Schedule:
    """Cheapest schedule of `graph` whose peak stays within `budget_bytes`.

    Semantics in schedule.py (Checkmate's convention: sinks need not stay resident at the end).
    A budget no schedule can meet gives `Schedule(feasible=False, reason=...)`; malformed input
    raises ValueError.

    `method="auto"` runs cpsat (warm-started, falling back to the greedy plan) when OR-Tools is
    installed, else the cheaper greedy plan; `Schedule.method` names what produced the plan.

    >>> from memplan.remat import make_graph
    >>> g = make_graph(["a", "b"], [1, 1], [4, 4], [("a", "b")])
    >>> solve(g, 8, method="no-recompute").events
    (('compute', 'a'), ('compute', 'b'), ('free', 'a'), ('free', 'b'))
    """
    if not isinstance(graph, Graph):
        raise ValueError(f"graph must be a memplan.remat.Graph, got {type(graph).__name__}")
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ValueError(f"budget_bytes must be a non-negative int, got {budget_bytes!r}")
    base = config or SolverConfig()
    config = dataclasses.replace(base, time_limit_s=time_limit_s, seed=seed, workers=workers)
    start_s = time.perf_counter()
    if method != "auto":
        get(method)  # unknown names are an input error even when the budget is hopeless
    floor_bytes, node = minimum_bytes(graph)
    if budget_bytes < floor_bytes:
        reason = f"budget {budget_bytes} B < {floor_bytes} B that {graph.names[node]!r} and its inputs need"
        return infeasible(method, reason, start_s)
    if method != "auto":
        solver = get(method)
        if not solver.can_solve(graph, config):
            raise ValueError(f"method {method!r} cannot solve this graph ({len(graph)} nodes)")
        return solver.solve(graph, budget_bytes, config=config)
    if get("cpsat").can_solve(graph, config):
        return get("cpsat").solve(graph, budget_bytes, config=config)
    plans = [get(name).solve(graph, budget_bytes, config=config) for name in AUTO_FALLBACKS]
    feasible = [p for p in plans if p.feasible]
    return min(feasible, key=lambda p: p.total_cost) if feasible else plans[0]


def minimum_bytes(graph: Graph) -> tuple[int, int]:
    """The least budget any schedule needs: max over nodes of output + inputs bytes (and the node)."""
    need = [(graph.bytes[v] + sum(graph.bytes[p] for p in graph.preds[v]), v) for v in range(len(graph))]
    best = max(need, key=lambda item: (item[0], -item[1]), default=(0, -1))
    return best
