"""`brute-force`: Dijkstra over (resident set, computed-ever set); the optimum oracle for tiny graphs.

Explores every order and every free, so it is exact for the semantics in schedule.py. States grow
like 3^n, hence `can_solve` caps it at 12 nodes.
"""

from __future__ import annotations

import heapq
import itertools
import time

from memplan.remat.graph import Graph
from memplan.remat.registry import SolverConfig, register
from memplan.remat.schedule import Schedule, build, infeasible

MAX_NODES = 12


def _can_solve(problem: Graph, config: SolverConfig) -> bool:
    return len(problem) <= MAX_NODES


@register("brute-force", can_solve=_can_solve)
def solve(problem: Graph, budget_bytes: int, *, config: SolverConfig) -> Schedule:
    start_s = time.perf_counter()
    if len(problem) > MAX_NODES:
        raise ValueError(f"brute-force handles at most {MAX_NODES} nodes, got {len(problem)}")
    computes = _search(problem, budget_bytes)
    if computes is None:
        return infeasible("brute-force", f"no schedule fits {budget_bytes} B", start_s)
    return build(problem, computes, method="brute-force", budget_bytes=budget_bytes, start_s=start_s, gap=0.0)


def _search(g: Graph, budget_bytes: int) -> list[int] | None:
    n = len(g)
    pred_mask = [sum(1 << p for p in ps) for ps in g.preds]
    sink = [not s for s in g.succs]
    start, goal = (0, 0), (1 << n) - 1
    best = {start: 0}
    parent: dict[tuple[int, int], tuple[tuple[int, int], int | None]] = {}
    tie = itertools.count()  # FIFO among equal costs keeps the search deterministic
    heap = [(0, next(tie), start)]
    while heap:
        cost, _, state = heapq.heappop(heap)
        if cost > best[state]:
            continue
        resident, done = state
        if done == goal:
            return _path(parent, state)
        used = sum(g.bytes[i] for i in range(n) if resident >> i & 1)
        for v in range(n):
            bit = 1 << v
            if resident & bit:
                _push(heap, best, parent, tie, cost, state, (resident & ~bit, done), None)
            elif resident & pred_mask[v] == pred_mask[v] and used + g.bytes[v] <= budget_bytes:
                nxt = (resident if sink[v] else resident | bit, done | bit)
                _push(heap, best, parent, tie, cost + g.time[v], state, nxt, v)
    return None


def _push(heap, best, parent, tie, cost, state, nxt, action) -> None:
    if cost < best.get(nxt, float("inf")):
        best[nxt] = cost
        parent[nxt] = (state, action)
        heapq.heappush(heap, (cost, next(tie), nxt))


def _path(parent, state) -> list[int]:
    computes = []
    while state in parent:
        state, action = parent[state]
        if action is not None:
            computes.append(action)
    return computes[::-1]
