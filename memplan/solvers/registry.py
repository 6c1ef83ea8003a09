"""Solvers by name, and ``auto``: every fast solver, the cheapest schedule that fits.

``auto`` runs the solvers that take seconds and are deterministic, so that its plans are
reproducible and monotone in the budget; on large graphs, side by side (``PARALLEL_MIN_NODES``).
``cpsat`` runs them too, as its warm starts, then searches for what is left of
``config.time_limit_s``: slower, usually cheaper.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Callable

from memplan.graph import JointGraph
from memplan.heap import frozen
from memplan.solvers import chain_dp, chen_greedy, cpsat, log, none, pointwise, sqrt
from memplan.solvers.base import SolverConfig, StepSchedule, at_budget

logger = logging.getLogger(__name__)

Solver = Callable[..., StepSchedule]

FAST_SOLVERS: dict[str, Solver] = {
    "none": none.solve,
    "sqrt": sqrt.solve,
    "chen-greedy": chen_greedy.solve,
    "log": log.solve,
    "chain-dp": chain_dp.solve,
    "pointwise": pointwise.solve,
}


def _cpsat(graph: JointGraph, budget_bytes: int, *, config: SolverConfig) -> StepSchedule:
    """CP-SAT from the fast solvers' schedules, whose time counts against its wall-clock limit,
    so that the limit bounds the whole solve (on ResNet-1001 they alone took longer than the
    default 30 s, on a 2-core CPU); not against a deterministic one."""
    started = time.perf_counter()
    warm_starts = list(_solve_each(list(FAST_SOLVERS), graph, budget_bytes, config=config).values())
    left = config.time_limit_s - (time.perf_counter() - started)
    return cpsat.solve(graph, budget_bytes, config=replace(config, time_limit_s=left),
                       warm_starts=warm_starts)


SOLVERS: dict[str, Solver] = {**FAST_SOLVERS, "cpsat": _cpsat}


def solve(method: str, graph: JointGraph, budget_bytes: int, *, config: SolverConfig) -> StepSchedule:
    if method not in SOLVERS:
        raise ValueError(f"unknown method {method!r}: choose one of {['auto', *SOLVERS]}")
    start = time.perf_counter()
    schedule = SOLVERS[method](graph, budget_bytes, config=config)
    elapsed = time.perf_counter() - start
    logger.info("%s: peak %d B, overhead %.3f, %.2f s", method, schedule.peak_bytes,
                schedule.overhead, elapsed)
    return replace(schedule, solve_time_s=elapsed)


# Graphs of this many nodes or more are solved by the fast solvers side by side, in processes
# forked from this one (which inherit the graph instead of unpickling it): on ResNet-1001's
# compiled graph, 70,699 nodes, they took 28 s one after another on an H200's host.
PARALLEL_MIN_NODES = 5_000
# The order in which they are handed out: the slowest first (on ResNet-1001, chain-dp took
# 11.5 s, pointwise 6.2, log 3.6, chen-greedy 3.2, none 2.2, sqrt 1.4).
SLOWEST_FIRST = ("chain-dp", "pointwise", "log", "chen-greedy", "none", "sqrt")
_forked: tuple[JointGraph, int, SolverConfig] | None = None  # what the forked processes solve


def _solve_forked(method: str) -> StepSchedule:
    assert _forked is not None
    graph, budget_bytes, config = _forked
    return solve(method, graph, budget_bytes, config=config)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _solve_each(methods: list[str], graph: JointGraph, budget_bytes: int, *,
                config: SolverConfig) -> dict[str, StepSchedule]:
    """Each method's schedule, in the order given; the same whether they run one after another
    or in forked processes (on Linux, where forking is safe for them: they are pure Python on
    the graph, and none touches a device)."""
    workers = min(len(methods), _cores())
    if workers < 2 or len(graph.nodes) < PARALLEL_MIN_NODES or sys.platform != "linux":
        return {method: solve(method, graph, budget_bytes, config=config) for method in methods}
    global _forked
    order = sorted(methods, key=lambda m: SLOWEST_FIRST.index(m) if m in SLOWEST_FIRST else -1)
    _forked = (graph, budget_bytes, config)
    # Frozen, what the processes inherit is passed over by their garbage collections, which
    # would otherwise write to every object, and so copy the whole heap page by page, in each
    # (on an H200's host, chain-dp took 17.5 s instead of 13.1).
    try:
        with frozen(), ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            solved = dict(zip(order, pool.map(_solve_forked, order)))
    finally:
        _forked = None
    return {method: solved[method] for method in methods}


def solve_auto(graph: JointGraph, budget_bytes: int, *, config: SolverConfig,
               unplanned: StepSchedule | None = None) -> list[StepSchedule]:
    """Every fast solver's schedule, the cheapest fitting one first (stable: registry order on
    ties). ``unplanned``, ``none``'s schedule at another budget, is not simulated again (2 s on
    ResNet-1001's compiled graph)."""
    reused = {}
    if unplanned is not None:
        reused["none"] = at_budget(graph, unplanned, budget_bytes, config=config)
    solved = _solve_each([name for name in FAST_SOLVERS if name not in reused], graph,
                         budget_bytes, config=config)
    schedules = [reused.get(name) or solved[name] for name in FAST_SOLVERS]
    # Ties in time go to the smaller peak, then to registry order (the sort is stable).
    return sorted(schedules, key=lambda s: (not s.feasible, s.recompute_s if s.feasible
                                            else s.peak_bytes, s.peak_bytes))
