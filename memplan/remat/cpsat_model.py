"""CP-SAT slot model for rematerialization (our own formulation, in the spirit of Checkmate's R/S).

A plan is a sequence of *slots*; slot s may compute one node from `cands[s]` (x[s, v]) and r[s, v]
says v is resident just before slot s. Frees need no variables: r may drop any value between slots.

    r[s+1, v] <= r[s, v] + x[s, v]                     a value exists only once computed
    x[s, v]   <= r[s, p]          for p in preds(v)    inputs resident while computing
    sum_v r[s, v] b_v + sum_v x[s, v] b_v <= budget    memory at every compute step
    sum_s x[s, v] >= 1                                 every node computed
    minimise sum_{s, v} x[s, v] time_v

Size: r[., v] only matters at slots that compute or read v ("touches"); between two touches keeping
v longer never helps, so one variable per segment between touches stands for all of r[., v], and
the memory at slot s is carried by an integer M[s] updated only by the segments that change there.
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
    """`cands[s]`: nodes slot s may compute; `forced[s]`: the node it must compute, or -1."""

    cands: tuple[tuple[int, ...], ...]
    forced: tuple[int, ...]
    stage: tuple[int, ...]
    complete: bool  # every optimal schedule fits this plan
    exact: bool  # any slot may compute any node


def exact_plan(graph: Graph, n_slots: int, complete: bool) -> SlotPlan:
    every = tuple(range(len(graph)))
    return SlotPlan((every,) * n_slots, (-1,) * n_slots, tuple(range(n_slots)), complete, True)


def staged_plan(graph: Graph, hint: list[int], shift_stages: int) -> SlotPlan:
    """Stages over the topological order; recompute candidates = the hint's, +- shift_stages."""
    n = len(graph)
    recompute: list[set[int]] = [set() for _ in range(n)]
    for t, v in _hint_stages(hint):
        for u in range(max(v + 1, t - shift_stages), min(n, t + shift_stages + 1)):
            recompute[u].add(v)
    cands, forced, stage = [], [], []
    for t in range(n):
        for v in sorted(recompute[t]) + [t]:
            cands.append((v,))
            forced.append(t if v == t else -1)
            stage.append(t)
    return SlotPlan(tuple(cands), tuple(forced), tuple(stage), False, False)


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


def build_model(graph: Graph, budget_bytes: int, plan: SlotPlan, hint_slots: list[int] | None):
    """The CP-SAT model and its x variables per slot (plus the cost scale); hints set if given."""
    model = cp_model.CpModel()
    x = [{v: model.NewBoolVar(f"x{s}_{v}") for v in plan.cands[s]} for s in range(len(plan.cands))]
    seg = _segments(model, graph, plan, x)
    mem = _memory(model, graph, budget_bytes, x, seg)
    for v in range(len(graph)):
        model.AddBoolOr([xs[v] for xs in x if v in xs])
    scale = _time_scale(graph)
    model.Minimize(sum(xv * round(graph.time[v] * scale) for xs in x for v, xv in xs.items()))
    _symmetry(model, plan, x)
    if hint_slots is not None:
        _add_hint(model, graph, x, seg, mem, hint_slots)
    return model, x, scale


def _segments(model, graph: Graph, plan: SlotPlan, x) -> list[dict[int, tuple]]:
    """seg[s][v] = (before, after): v's residency variable (or 0) before and after slot s, for the
    values that slot s touches (computes or reads). Adds the precedence and existence constraints."""
    current: dict[int, object] = {}  # node -> variable of its open segment (absent: not resident)
    seg: list[dict[int, tuple]] = []
    for s, xs in enumerate(x):
        for v, xv in xs.items():
            if plan.forced[s] == v:
                model.Add(xv == 1)
            for p in graph.preds[v]:
                model.AddImplication(xv, current[p]) if p in current else model.Add(xv == 0)
        touched = sorted(set(xs) | {p for v in xs for p in graph.preds[v]})
        seg.append({})
        for v in touched:
            before = current.get(v, 0)
            after = model.NewBoolVar(f"r{s}_{v}")
            model.Add(after <= before + xs[v]) if v in xs else model.Add(after <= before)
            current[v] = after
            seg[s][v] = (before, after)
    return seg


def _memory(model, graph: Graph, budget_bytes: int, x, seg) -> list:
    """mem[s] = bytes resident before slot s; mem[s] + outputs of slot s <= budget."""
    total = sum(graph.bytes)
    mem = [model.NewIntVar(0, total, f"mem{s}") for s in range(len(x) + 1)]
    model.Add(mem[0] == 0)
    for s, xs in enumerate(x):
        model.Add(mem[s] + sum(xv * graph.bytes[v] for v, xv in xs.items()) <= budget_bytes)
        delta = [(after - before) * graph.bytes[v] for v, (before, after) in seg[s].items() if graph.bytes[v]]
        model.Add(mem[s + 1] == mem[s] + sum(delta))
    return mem


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


def _add_hint(model, graph: Graph, x, seg, mem, hint_slots: list[int]) -> None:
    """hint_slots[s]: the node computed at slot s, or -1; residency follows by earliest frees.

    A segment variable opened at slot s is hinted with residency just before the next compute,
    which is constant until v's next touch under earliest frees."""
    before = resident_before(graph, [v for v in hint_slots if v >= 0])
    k = 0
    for s, v in enumerate(hint_slots):
        model.AddHint(mem[s], sum(graph.bytes[u] for u in before[k]))
        for u, xu in x[s].items():
            model.AddHint(xu, u == v)
        k += v >= 0
        for u, (_, after) in seg[s].items():
            model.AddHint(after, u in before[k])
    model.AddHint(mem[-1], sum(graph.bytes[u] for u in before[k]))
