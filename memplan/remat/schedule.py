"""Schedules: the event list every solver returns, and the one way to build one.

Semantics (Checkmate, MLSys 2020; Moccasin, ICML 2023): a node may be computed only while all its
predecessors are resident; its output is resident from its computation until freed; memory at a
compute is the bytes of every resident output including the new one; every node is computed at
least once; the cost is the sum of the times of all computations. As in Checkmate, nothing has to
stay resident at the end: a sink (e.g. the last gradient) counts at its own compute step and is
freed right after it.
"""

from __future__ import annotations

import dataclasses
import time as _time
from typing import Optional, Sequence

from memplan.remat.graph import Graph

Event = tuple[str, str]  # ("compute" | "free", node name)


class InternalError(RuntimeError):
    """A solver broke its own invariant (a bug in memplan, not in the input)."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A plan and its evidence. Infeasibility is reported here (feasible=False, reason), never raised.

    `gap` is a valid bound on (cost - optimum) / cost over *all* schedules of the graph, 0.0 when
    proven optimal, None when no bound is known.
    """

    events: tuple[Event, ...]
    peak_bytes: int
    total_cost: int | float
    solve_time_s: float
    feasible: bool
    gap: Optional[float]
    method: str
    reason: str = ""
    detail: str = ""
    memory_timeline_bytes: tuple[int, ...] = ()

    @property
    def computes(self) -> tuple[str, ...]:
        return tuple(name for kind, name in self.events if kind == "compute")


def infeasible(method: str, reason: str, start_s: float) -> Schedule:
    return Schedule((), 0, 0, _time.perf_counter() - start_s, False, None, method, reason=reason)


def events_from_computes(graph: Graph, computes: Sequence[int]) -> list[tuple[str, int]]:
    """Insert the earliest possible frees into a compute sequence (node indices).

    Each computed instance is freed right after its last reader before the next recomputation of
    the same node (or right after its own compute if nothing reads it). Raises ValueError when a
    compute reads an input that was never computed.
    """
    free_after: list[list[int]] = [[] for _ in computes]
    current: dict[int, int] = {}  # node -> step that computed its resident instance
    last_read: dict[int, int] = {}  # instance step -> step of its last reader so far
    for step, v in enumerate(computes):
        for p in graph.preds[v]:
            if p not in current:
                raise ValueError(f"step {step}: {graph.names[v]!r} reads {graph.names[p]!r} before it is computed")
            last_read[current[p]] = step
        if v in current:
            free_after[last_read.pop(current[v])].append(v)
        current[v] = step
        last_read[step] = step
    for v in sorted(current):
        free_after[last_read.pop(current[v])].append(v)
    events: list[tuple[str, int]] = []
    for step, v in enumerate(computes):
        events.append(("compute", v))
        events.extend(("free", u) for u in sorted(free_after[step]))
    return events


def replay(graph: Graph, events: Sequence[tuple[str, int]]) -> tuple[int, int | float, list[int]]:
    """Peak bytes, total cost and the memory at every compute; ValueError if the events break the rules."""
    resident: set[int] = set()
    resident_bytes, peak, cost, timeline = 0, 0, 0, []
    computed: set[int] = set()
    for kind, v in events:
        if kind == "free":
            if v not in resident:
                raise ValueError(f"free of non-resident {graph.names[v]!r}")
            resident.discard(v)
            resident_bytes -= graph.bytes[v]
            continue
        missing = [graph.names[p] for p in graph.preds[v] if p not in resident]
        if missing or v in resident:
            raise ValueError(f"compute {graph.names[v]!r}: inputs not resident {missing} or already resident")
        resident.add(v)
        computed.add(v)
        resident_bytes += graph.bytes[v]
        peak = max(peak, resident_bytes)
        cost += graph.time[v]
        timeline.append(resident_bytes)
    if len(computed) != len(graph):
        raise ValueError(f"{len(graph) - len(computed)} nodes are never computed")
    return peak, cost, timeline


def build(
    graph: Graph,
    computes: Sequence[int],
    *,
    method: str,
    budget_bytes: int,
    start_s: float,
    gap: Optional[float] = None,
    detail: str = "",
) -> Schedule:
    """Turn a compute sequence into a checked Schedule (frees inserted, peak replayed)."""
    events = events_from_computes(graph, computes)
    peak, cost, timeline = replay(graph, events)
    if peak > budget_bytes:
        raise InternalError(f"{method}: plan peak {peak} exceeds budget {budget_bytes}")
    return Schedule(
        events=tuple((kind, graph.names[v]) for kind, v in events),
        peak_bytes=peak,
        total_cost=cost,
        solve_time_s=_time.perf_counter() - start_s,
        feasible=True,
        gap=gap,
        method=method,
        detail=detail,
        memory_timeline_bytes=tuple(timeline),
    )


def lower_bound_gap(graph: Graph, cost: int | float, bound: int | float | None = None) -> Optional[float]:
    """Relative gap against a lower bound on the optimum: at least every node computed once."""
    lb = max(sum(graph.time), bound if bound is not None else 0)
    if cost <= 0:
        return 0.0
    return max(0.0, (cost - lb) / cost)
