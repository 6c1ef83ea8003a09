"""Solvers by name, and ``auto``: every fast solver, the cheapest schedule that fits.

``auto`` runs the solvers that take seconds and are deterministic, so that its plans are
reproducible and monotone in the budget. ``cpsat`` runs them too, as its warm starts, then
searches for what is left of ``config.time_limit_s``: slower, usually cheaper.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable

from memplan.graph import JointGraph
from memplan.solvers import chain_dp, chen_greedy, cpsat, log, none, pointwise, sqrt
from memplan.solvers.base import SolverConfig, StepSchedule, evaluate

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
    warm_starts = [solver(graph, budget_bytes, config=config) for solver in FAST_SOLVERS.values()]
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


def solve_auto(graph: JointGraph, budget_bytes: int, *, config: SolverConfig,
               unplanned: StepSchedule | None = None) -> list[StepSchedule]:
    """Every fast solver's schedule, the cheapest fitting one first (stable: registry order on
    ties). ``unplanned``, ``none``'s schedule at another budget, is not simulated again (2 s on
    ResNet-1001's compiled graph)."""
    schedules = [replace(evaluate(graph, unplanned.program, budget_bytes, method=name,
                                  config=config, timeline=unplanned.timeline),
                         solve_time_s=unplanned.solve_time_s)
                 if name == "none" and unplanned is not None
                 else solve(name, graph, budget_bytes, config=config) for name in FAST_SOLVERS]
    # Ties in time go to the smaller peak, then to registry order (the sort is stable).
    return sorted(schedules, key=lambda s: (not s.feasible, s.recompute_s if s.feasible
                                            else s.peak_bytes, s.peak_bytes))
