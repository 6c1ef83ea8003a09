"""Solver registry: every solver is `solve(problem, budget_bytes, *, config) -> Schedule`."""

from __future__ import annotations

import dataclasses
from typing import Callable

from memplan.remat.graph import Graph
from memplan.remat.schedule import Schedule


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Options shared by all solvers; vary with `dataclasses.replace`."""

    time_limit_s: float = 30.0
    seed: int = 0
    workers: int = 2
    exact_max_nodes: int = 12  # cpsat: up to this size, any node may be computed at any slot
    exact_max_slots: int = 80  # cpsat exact model: cap on compute slots
    shift_stages: int = 2  # cpsat staged model: a hinted recompute may move this many stages


SolveFn = Callable[..., Schedule]
CanSolveFn = Callable[[Graph, SolverConfig], bool]


@dataclasses.dataclass(frozen=True)
class Solver:
    name: str
    solve: SolveFn
    can_solve: CanSolveFn


_REGISTRY: dict[str, Solver] = {}


def register(name: str, can_solve: CanSolveFn = lambda graph, config: True):
    """Decorator registering `solve` under `name`."""

    def wrap(fn: SolveFn) -> SolveFn:
        if name in _REGISTRY:
            raise ValueError(f"solver {name!r} registered twice")
        _REGISTRY[name] = Solver(name, fn, can_solve)
        return fn

    return wrap


def get(name: str) -> Solver:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(_REGISTRY)
