"""Solvers by name, and ``auto``: every solver, the cheapest schedule that fits."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable

from memplan.graph import JointGraph
from memplan.solvers import chain_dp, chen_greedy, log, none, sqrt
from memplan.solvers.base import SolverConfig, StepSchedule

logger = logging.getLogger(__name__)

Solver = Callable[..., StepSchedule]

SOLVERS: dict[str, Solver] = {
    "none": none.solve,
    "sqrt": sqrt.solve,
    "chen-greedy": chen_greedy.solve,
    "log": log.solve,
    "chain-dp": chain_dp.solve,
}


def solve(method: str, graph: JointGraph, budget_bytes: int, *, config: SolverConfig) -> StepSchedule:
    if method not in SOLVERS:
        raise ValueError(f"unknown method {method!r}: choose one of {['auto', *SOLVERS]}")
    start = time.perf_counter()
    schedule = SOLVERS[method](graph, budget_bytes, config=config)
    elapsed = time.perf_counter() - start
    logger.info("%s: peak %d B, overhead %.3f, %.2f s", method, schedule.peak_bytes,
                schedule.overhead, elapsed)
    return replace(schedule, solve_time_s=elapsed)


def solve_auto(graph: JointGraph, budget_bytes: int, *, config: SolverConfig) -> list[StepSchedule]:
    """Every solver's schedule, the cheapest fitting one first (stable: registry order on ties)."""
    schedules = [solve(name, graph, budget_bytes, config=config) for name in SOLVERS]
    # Ties in time go to the smaller peak, then to registry order (the sort is stable).
    return sorted(schedules, key=lambda s: (not s.feasible, s.recompute_s if s.feasible
                                            else s.peak_bytes, s.peak_bytes))
