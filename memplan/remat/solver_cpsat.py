"""`cpsat`: an OR-Tools CP-SAT model (cpsat_model.py), warm-started from the best greedy plan.

Steps:
1. Run the greedy heuristics; the cheapest feasible plan is the hint (and the fallback).
2. Graphs of at most `config.exact_max_nodes` nodes get the exact slot model (any node at any slot),
   larger ones the staged model restricted around the hint. The hint is a complete, feasible
   assignment of either model, so CP-SAT starts from it and only improves it.
3. Solve with `time_limit_s` (minus step 1), `workers` and `seed`. `interleave_search` makes the
   parallel search deterministic for fixed seed and workers, except where the wall-clock limit
   stops it (then two runs may stop at different incumbents).
4. If CP-SAT returns no plan in time, return the hint and say so in `detail` (method = heuristic).

`gap` is a bound over all schedules: against CP-SAT's bound when the exact model is complete
(positive times, enough slots), else against "every node computed once".
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time

from memplan.remat.graph import Graph
from memplan.remat.registry import SolverConfig, get, register
from memplan.remat.schedule import Schedule, build, infeasible, lower_bound_gap

HEURISTICS = ("greedy-belady", "greedy-dtr")
EXTRACT_MARGIN_S = 0.3


def _can_solve(problem: Graph, config: SolverConfig) -> bool:
    return importlib.util.find_spec("ortools") is not None


@register("cpsat", can_solve=_can_solve)
def solve(problem: Graph, budget_bytes: int, *, config: SolverConfig) -> Schedule:
    try:
        from memplan.remat import cpsat_model
    except ImportError as e:
        raise ImportError("method 'cpsat' needs OR-Tools: pip install ortools") from e
    start_s = time.perf_counter()
    if not len(problem):
        return build(problem, [], method="cpsat", budget_bytes=budget_bytes, start_s=start_s, gap=0.0)
    hint, reasons = _best_heuristic(problem, budget_bytes, config)
    if len(problem) <= config.exact_max_nodes:
        plan, hint_slots = _exact(cpsat_model, problem, hint, config)
    elif hint is None:
        return infeasible("cpsat", f"staged model needs a heuristic plan to start from; {reasons}", start_s)
    else:
        plan, hint_slots = _staged(cpsat_model, problem, hint, config)
    heuristic_s = time.perf_counter() - start_s
    model, x, scale = cpsat_model.build_model(problem, budget_bytes, plan, hint_slots)
    build_s = time.perf_counter() - start_s - heuristic_s
    # keep a moment for extracting and replaying the plan inside the time limit
    solver = _solver(config, config.time_limit_s - (time.perf_counter() - start_s) - EXTRACT_MARGIN_S)
    status = solver.Solve(model)
    status_name = solver.StatusName(status)
    model_desc = (
        f"{'exact' if plan.exact else 'staged'} model, {len(plan.cands)} slots, CP-SAT {status_name} "
        f"(heuristics {heuristic_s:.1f} s, model build {build_s:.1f} s, search {solver.WallTime():.1f} s)"
    )
    hint_desc = f"hint {hint.method} cost {hint.total_cost}" if hint else f"no hint ({reasons})"
    if status_name in ("OPTIMAL", "FEASIBLE"):
        computes = [v for xs in x for v, xv in xs.items() if solver.Value(xv)]
        sched = build(problem, computes, method="cpsat", budget_bytes=budget_bytes, start_s=start_s)
        bound = solver.BestObjectiveBound() / scale
        gap = lower_bound_gap(problem, sched.total_cost, bound if plan.complete else None)
        if plan.complete and status_name == "OPTIMAL":
            gap = 0.0
        detail = f"{model_desc}, model bound {bound:g}, {hint_desc}"
        return dataclasses.replace(sched, gap=gap, detail=detail)
    if hint is not None:
        detail = f"{model_desc}; fell back to the hint"
        return dataclasses.replace(hint, solve_time_s=time.perf_counter() - start_s, detail=detail)
    why = "proven infeasible" if plan.complete and status_name == "INFEASIBLE" else "no plan found"
    return infeasible("cpsat", f"{model_desc}: {why} at {budget_bytes} B; {hint_desc}", start_s)


def _best_heuristic(problem: Graph, budget_bytes: int, config: SolverConfig) -> tuple[Schedule | None, str]:
    plans = [get(name).solve(problem, budget_bytes, config=config) for name in HEURISTICS]
    feasible = [p for p in plans if p.feasible]
    reasons = "; ".join(f"{p.method}: {p.reason}" for p in plans if not p.feasible)
    # min() keeps the first of equal costs: HEURISTICS order breaks ties
    return (min(feasible, key=lambda p: p.total_cost) if feasible else None), reasons


def _indices(problem: Graph, sched: Schedule) -> list[int]:
    index = {name: i for i, name in enumerate(problem.names)}
    return [index[name] for name in sched.computes]


def _exact(cpsat_model, problem: Graph, hint: Schedule | None, config: SolverConfig):
    """Slots = computes the optimum can afford (cost <= hint cost, every time >= min time)."""
    min_time = min(problem.time, default=0)
    if hint is not None and min_time > 0:
        needed = max(len(problem), math.floor(hint.total_cost / min_time + 1e-9))
        n_slots, complete = min(needed, config.exact_max_slots), needed <= config.exact_max_slots
    else:
        n_slots, complete = config.exact_max_slots, False
    plan = cpsat_model.exact_plan(problem, n_slots, complete)
    computes = _indices(problem, hint) if hint is not None else None
    if computes is None or len(computes) > n_slots:
        return plan, None
    return plan, computes + [-1] * (n_slots - len(computes))


def _staged(cpsat_model, problem: Graph, hint: Schedule, config: SolverConfig):
    computes = _indices(problem, hint)
    plan = cpsat_model.staged_plan(problem, computes, config.shift_stages)
    pairs = set(zip(cpsat_model.hint_stage_of(computes), computes))
    slots = [cands[0] if (t, cands[0]) in pairs else -1 for t, cands in zip(plan.stage, plan.cands)]
    return plan, slots


def _solver(config: SolverConfig, time_left_s: float):
    from ortools.sat.python import cp_model

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.0, time_left_s)
    solver.parameters.num_workers = config.workers
    solver.parameters.random_seed = config.seed
    solver.parameters.interleave_search = True
    return solver
