"""CP-SAT slot model for rematerialization (our own formulation, in the spirit of Checkmate's R/S).

A plan is a sequence of *slots*; slot s may compute one node from `cands[s]` (x[s, v]) and r[s, v]
says v is resident just before slot s. Frees need no variables: r may drop any value between slots.

    r[s+1, v] <= r[s, v] + x[s, v]                     a value exists only once computed
    x[s, v]   <= r[s, p]          for p in preds(v)    inputs resident while computing
    sum_v r[s, v] b_v + sum_v x[s, v] b_v <= budget    memory at every compute step
    sum_s x[s, v] >= 1                                 every node computed
    minimise sum_{s, v} x[s, v] time_v

Two slot plans: `exact_plan` lets every slot compute any node (complete when the slot count bounds
the optimum's number of computes); `staged_plan` fixes Checkmate's stages over the topological
order (stage t = some recomputes in index order, then t) and restricts recomputes to a heuristic
plan's, shifted by a few stages, so that it scales to ~1,000 nodes.
"""

from __future__ import annotations

import dataclasses
import math

from ortools.sat.python import cp_model

from memplan.remat.graph import Graph
from memplan.remat.schedule import events_from_computes


@dataclasses.dataclass(frozen=True)
class SlotPlan:
    """`cands[s]`: nodes slot s may compute; `forced[s]`: the node slot s must compute, or -1;
    `resident[s]`: nodes that may be resident before slot s; `passive[s]`: those whose residency
    cannot change inside the slot's stage (one variable shared by the stage)."""

    cands: tuple[tuple[int, ...], ...]
    forced: tuple[int, ...]
    resident: tuple[tuple[int, ...], ...]
    stage: tuple[int, ...]
    passive: tuple[frozenset[int], ...]
    complete: bool  # every optimal schedule fits this plan
    exact: bool  # any slot may compute any node


def exact_plan(graph: Graph, n_slots: int, complete: bool) -> SlotPlan:
    every = tuple(range(len(graph)))
    return SlotPlan(
        cands=(every,) * n_slots,
        forced=(-1,) * n_slots,
        resident=(every,) * n_slots,
        stage=tuple(range(n_slots)),
        passive=(frozenset(),) * n_slots,
        complete=complete,
        exact=True,
    )


def staged_plan(graph: Graph, hint: list[int], shift_stages: int) -> SlotPlan:
    """Stages over the topological order; recompute candidates = the hint's, +- shift_stages."""
    n = len(graph)
    recompute: list[set[int]] = [set() for _ in range(n)]
    for t, v in _hint_stages(hint):
        for u in range(max(v + 1, t - shift_stages), min(n, t + shift_stages + 1)):
            recompute[u].add(v)
    last_use = [max(s, default=i) for i, s in enumerate(graph.succs)]
    hint_resident = _hint_resident_by_stage(graph, hint)
    cands, forced, resident, stage, passive = [], [], [], [], []
    for t in range(n):
        slots = sorted(recompute[t]) + [t]
        active = set(slots) | {p for v in slots for p in graph.preds[v]}
        live = {v for v in range(t) if last_use[v] >= t} | hint_resident[t] | active
        live.discard(t)
        res = tuple(sorted(live | set(slots[:-1])))
        for v in slots:
            cands.append((v,))
            forced.append(t if v == t else -1)
            resident.append(res)
            stage.append(t)
            passive.append(frozenset(live - active))
    return SlotPlan(tuple(cands), tuple(forced), tuple(resident), tuple(stage), tuple(passive), False, False)


def hint_stage_of(hint: list[int]) -> list[int]:
    """Stage of each compute of a stage-ordered plan: the next node computed for the first time."""
    stage_of = [-1] * len(hint)
    seen: set[int] = set()
    pending: list[int] = []
    for k, v in enumerate(hint):
        pending.append(k)
        if v not in seen:
            seen.add(v)
            for j in pending:
                stage_of[j] = v
            pending = []
    return stage_of


def _hint_stages(hint: list[int]):
    """(stage, node) of every recompute in a stage-ordered plan."""
    seen: set[int] = set()
    for (v, t) in zip(hint, hint_stage_of(hint)):
        if v in seen:
            yield t, v
        seen.add(v)


def resident_before(graph: Graph, computes: list[int]) -> list[frozenset[int]]:
    """Values resident just before each compute (and once more at the end) under earliest frees."""
    out: list[frozenset[int]] = []
    resident: set[int] = set()
    for kind, v in events_from_computes(graph, computes):
        if kind == "compute":
            out.append(frozenset(resident))
            resident.add(v)
        else:
            resident.discard(v)
    out.append(frozenset(resident))
    return out


def _hint_resident_by_stage(graph: Graph, hint: list[int]) -> list[set[int]]:
    """Values resident at the start of each stage when the hint runs with earliest frees."""
    out: list[set[int]] = [set() for _ in graph.names]
    before = resident_before(graph, hint)
    stage_of = hint_stage_of(hint)
    for k, t in enumerate(stage_of):
        if k == 0 or stage_of[k - 1] != t:
            out[t] = set(before[k])
    return out


def build_model(graph: Graph, budget_bytes: int, plan: SlotPlan, hint_slots: list[int] | None):
    """The CP-SAT model and its x variables per slot (plus the cost scale); hints set if given."""
    model = cp_model.CpModel()
    x = [{v: model.NewBoolVar(f"x{s}_{v}") for v in plan.cands[s]} for s in range(len(plan.cands))]
    r = _residency_vars(model, plan)
    for rv in r[0].values() if r else ():
        model.Add(rv == 0)  # nothing is resident before the first compute
    _link(model, graph, plan, x, r)
    passive_bytes = _memory(model, graph, budget_bytes, plan, x, r)
    for v in range(len(graph)):
        model.AddBoolOr([xs[v] for xs in x if v in xs])
    scale = _time_scale(graph)
    model.Minimize(sum(xv * round(graph.time[v] * scale) for xs in x for v, xv in xs.items()))
    _symmetry(model, plan, x)
    if hint_slots is not None:
        _add_hint(model, graph, x, r, passive_bytes, hint_slots)
    return model, x, scale


def _link(model, graph: Graph, plan: SlotPlan, x, r) -> None:
    """Inputs resident while computing; a value resident only if resident or computed a slot before."""
    for s in range(len(x)):
        for v, xv in x[s].items():
            if plan.forced[s] == v:
                model.Add(xv == 1)
            for p in graph.preds[v]:
                model.AddImplication(xv, r[s][p]) if p in r[s] else model.Add(xv == 0)
        for v, rv in (r[s + 1] if s + 1 < len(x) else {}).items():
            prev = ([r[s][v]] if v in r[s] else []) + ([x[s][v]] if v in x[s] else [])
            if not prev:
                model.Add(rv == 0)
            elif not (len(prev) == 1 and prev[0] is rv):  # a stage's shared passive variable
                model.Add(rv <= sum(prev))


def _memory(model, graph: Graph, budget_bytes: int, plan: SlotPlan, x, r):
    """Peak constraint at every slot. A stage's passive values enter through one sum variable,
    which keeps the constraints linear in the model size. Returns [(var, {node: r var})]."""
    passive_bytes, stage_sum = [], None
    for s in range(len(x)):
        if s == 0 or plan.stage[s] != plan.stage[s - 1]:
            shared = {v: r[s][v] for v in sorted(plan.passive[s]) if graph.bytes[v]}
            stage_sum = None
            if shared:
                stage_sum = model.NewIntVar(0, sum(graph.bytes[v] for v in shared), f"passive{s}")
                model.Add(stage_sum == sum(rv * graph.bytes[v] for v, rv in shared.items()))
                passive_bytes.append((stage_sum, shared))
        terms = [rv * graph.bytes[v] for v, rv in r[s].items() if graph.bytes[v] and v not in plan.passive[s]]
        terms += [xv * graph.bytes[v] for v, xv in x[s].items() if graph.bytes[v]]
        terms += [stage_sum] if stage_sum is not None else []
        if terms:
            model.Add(sum(terms) <= budget_bytes)
    return passive_bytes


def _residency_vars(model, plan: SlotPlan) -> list[dict[int, cp_model.IntVar]]:
    r: list[dict] = []
    for s, res in enumerate(plan.resident):
        shared = r[-1] if s and plan.stage[s - 1] == plan.stage[s] else {}
        r.append({v: shared[v] if v in plan.passive[s] and v in shared else model.NewBoolVar(f"r{s}_{v}") for v in res})
    return r


def _symmetry(model, plan: SlotPlan, x) -> None:
    """Exact plans: used slots come first (an empty slot is followed only by empty slots)."""
    if not plan.exact:
        return
    for s in range(len(x) - 1):
        model.Add(sum(x[s + 1].values()) <= sum(x[s].values()))
    for xs in x:
        model.Add(sum(xs.values()) <= 1)


def _time_scale(graph: Graph) -> float:
    """CP-SAT needs integer costs: scale fractional times to 6 significant decimals."""
    if all(float(t).is_integer() for t in graph.time):
        return 1
    return 10 ** max(0, 6 - int(math.log10(max(max(graph.time), 1e-12))))


def _add_hint(model, graph: Graph, x, r, passive_bytes, hint_slots: list[int]) -> None:
    """hint_slots[s]: the node computed at slot s, or -1; residency follows by earliest frees."""
    before = resident_before(graph, [v for v in hint_slots if v >= 0])
    k, hinted = 0, set()
    for s, v in enumerate(hint_slots):
        for u, ru in r[s].items():
            if ru.Index() not in hinted:  # passive variables are shared by a stage's slots
                hinted.add(ru.Index())
                model.AddHint(ru, u in before[k])
        for u, xu in x[s].items():
            model.AddHint(xu, u == v)
        k += v >= 0
    hint_of = {index: value for index, value in zip(model.Proto().solution_hint.vars, model.Proto().solution_hint.values)}
    for stage_sum, shared in passive_bytes:
        model.AddHint(stage_sum, sum(graph.bytes[u] * hint_of[ru.Index()] for u, ru in shared.items()))
