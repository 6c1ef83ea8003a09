"""``cpsat``: which forward values backward keeps, by CP-SAT over the whole joint graph, with the
peak constrained at every step of forward and backward.

The schedules are the single-level programs of :func:`memplan.program.build_program`: keep a set
of forward values; backward recomputes every other value it needs just before its first use, and
recomputing a value whose inputs are not kept recomputes them too. The time axis is the forward
order followed by the backward nodes, and each choice is an optional interval of memory:

- keeping v holds its storage from its last forward use until its last backward use E_v;
- recomputing v allocates its outputs at T_v, its earliest consumer's step, until E'_v
  (a consumer that is itself recomputed reads it at its own T).

T and E are variables: how long a value lives depends on what else is recomputed. Their domains
are the widest windows any program could give.

Everything else (parameters, gradients, forward values between their producer and last forward
use, ...) is a fixed profile, measured by the simulator on the program that keeps every value.
One cumulative constraint keeps the sum under the budget at every step; the objective is the
recomputation time, recompute chains included (r_u >= r_v - keep_u).

Chains of pointwise ops are coarsened to one unit: a pointwise value whose only forward user is
another keepable pointwise value is never kept, only the chain's last value is a choice. Its
inner values are recomputed from the chain's input when backward reads them, as a compiler
would fuse them; the search space shrinks by every such value (optimal over coarsened keep sets).

The model over-approximates memory a little (the values recomputed before one backward node
count as if alive together); the simulator is the judge, and a plan it finds over budget tightens the capacity by the excess and
is solved again. Structurally identical blocks are solved first with their decisions tied, a far
smaller search, then untied from that plan. CP-SAT starts from the cheapest single-level
heuristic (chen-greedy), and the schedule returned is never worse than it. ``gap`` is CP-SAT's
relative optimality gap within this model.

The search stops at a wall-clock limit, ``time_limit_s``, so two runs that reach it may return
different plans (each simulated, each within budget); with ``workers=1`` and a fixed seed, a
search that finishes (``gap`` 0) is reproducible. With ``deterministic_time`` it stops at a limit
of CP-SAT's deterministic time instead, and its workers interleave their work in a fixed order
(``interleave_search``): the plan is then the same for a fixed seed and worker count, however
long the search takes on the machine. On the H200's compiled graph of GPT-2 medium at 50% (2 CPU
cores), 30 wall-clock seconds leave chain-dp's plan (+6.3%) unimproved, as do 4 units (100 s, the
same plan twice); 8 units took 167 s and found +4.2%.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

from memplan.graph import JointGraph, Phase
from memplan.liveness import simulate
from memplan.program import build_program, candidates, complete_saved_set, must_save
from memplan.solvers import chen_greedy
from memplan.solvers.base import SolverConfig, StepSchedule, evaluate
from memplan.solvers.blocks import representatives

_NANOSECONDS = 1e9
_RETRIES = 4  # re-solves after the simulator finds a plan over budget
_SURE_STEPS = 128  # steps that get a redundant linear memory constraint


@dataclass
class KeepModel:
    """The time axis, the fixed profile, and what keeping or recomputing each value holds."""

    forward_count: int  # steps [0, forward_count) are forward, the rest backward
    step_count: int
    base: list[int]  # bytes held at each step whatever is kept
    fixed_keep: set[str]  # kept in every program: random values, aliases of outputs or primals
    keep_first: dict[str, tuple[int, int]]  # keepable value -> (first step held past, bytes)
    recompute_bytes: dict[str, int]  # value backward may recompute -> bytes it allocates
    window: dict[str, tuple[int, int, int]]  # value -> earliest, latest recompute, last use + 1
    backward_reads: dict[str, list[int]]  # value -> backward steps that read it
    forward_users: dict[str, list[tuple[str, bool]]]  # value -> (recomputable user, aliases it)
    owner: dict[int, str]  # storage -> the first forward tensor value that refers to it
    coarsened: set[str]  # keepable values inside pointwise chains: never kept

    def assignment(self, graph: JointGraph, saved: tuple[str, ...]) -> tuple[set[str], set[str]]:
        """The model's keep and recompute sets for a program that saves ``saved``: a saved view
        keeps its base's storage, and is itself recomputed from it."""
        kept = {self.owner[s] for name in saved if name in self.recompute_bytes
                for s in graph[name].storages if self.owner.get(s) in self.keep_first}
        return self._completed(graph, kept - self.coarsened)

    def tied(self, graph: JointGraph, kept: set[str], ties: dict[str, str]) -> tuple[set[str], set[str]]:
        """The same decisions in every identical block: keep a value only where every block
        keeps it (less memory than the untied plan, so usually still within budget)."""
        dropped = {ties.get(name, name) for name in self.keep_first if name not in kept}
        return self._completed(graph, {name for name in kept if ties.get(name, name) not in dropped})

    def _completed(self, graph: JointGraph, kept: set[str]) -> tuple[set[str], set[str]]:
        _, recomputed = complete_saved_set(graph, self.fixed_keep | kept)
        return kept, set(recomputed)


def build_keep_model(graph: JointGraph) -> KeepModel:
    tensor_values = [n.name for n in candidates(graph)]
    keep_all = build_program(graph, tensor_values)
    forward_count = len(keep_all.forward)
    step_of = {name: forward_count + j for j, name in enumerate(keep_all.backward)}
    steps = forward_count + len(keep_all.backward)
    base = list(simulate(graph, keep_all).live_bytes)

    primal = graph._primal_storages
    output_storages = {s for name in graph.forward_outputs for s in graph[name].storages}
    owner: dict[int, str] = {}
    for name in tensor_values:
        for s in graph[name].storages:
            owner.setdefault(s, name)

    forward_position = {name: i for i, name in enumerate(keep_all.forward)}
    storage_last_forward: dict[int, int] = {}
    storage_last_backward: dict[int, int] = {}
    saved = set(keep_all.saved)
    for name, position in forward_position.items():
        last = max([position] + [forward_position[u] for u in graph.users[name]
                                 if u in forward_position])
        last_backward = max((step_of[u] for u in graph.users[name] if u in step_of), default=-1)
        for s in graph[name].storages:
            storage_last_forward[s] = max(storage_last_forward.get(s, -1), last)
            if name in saved:
                storage_last_backward[s] = max(storage_last_backward.get(s, -1), last_backward)

    def always_kept(node) -> bool:
        storages = set(node.storages)
        return node.is_tensor and (must_save(graph, node) or storages <= primal
                                   or bool(storages & output_storages))

    recomputable, fixed_keep = _needed_forward_values(graph, step_of, always_kept)
    step_of_reads = {name: [step_of[u] for u in graph.users[name] if u in step_of]
                     for name in recomputable}
    forward_users = {name: [(u, _aliases(graph, name, u)) for u in graph.users[name]
                            if u in step_of_reads] for name in recomputable}
    window = _recompute_windows(recomputable, step_of_reads, forward_users)

    keep_first: dict[str, tuple[int, int]] = {}
    recompute_bytes: dict[str, int] = {}
    for name in recomputable:
        node = graph[name]
        recompute_bytes[name] = sum(graph.storages[s].nbytes for s in graph.allocates[name]
                                    if s not in primal)
        storages = set(node.storages)
        if not (node.is_tensor and storages and all(owner.get(s) == name for s in storages)):
            continue  # a view or a tuple: keeping it is keeping its base
        first = max(storage_last_forward.get(s, 0) for s in storages) + 1
        nbytes = sum(graph.storages[s].nbytes for s in storages - primal)
        keep_first[name] = (first, nbytes)
        end = max(storage_last_backward.get(s, -1) for s in storages)
        for t in range(first, end + 1):  # the keep-everything profile holds it: take it out
            base[t] -= nbytes
    return KeepModel(forward_count, steps, base, fixed_keep, keep_first, recompute_bytes, window,
                     step_of_reads, forward_users, owner, _pointwise_chain_values(graph, keep_first))


def _pointwise_chain_values(graph: JointGraph, keepable) -> set[str]:
    """Pointwise values whose only forward user is a keepable pointwise value."""
    inner = set()
    for name in keepable:
        users = [u for u in graph.users[name] if graph[u].phase is Phase.FORWARD]
        if graph[name].pointwise and len(users) == 1 and graph[users[0]].pointwise \
                and users[0] in keepable:
            inner.add(name)
    return inner


def _recompute_windows(recomputable: list[str], reads: dict[str, list[int]],
                       forward_users: dict[str, list[tuple[str, bool]]]):
    """Per value: the earliest and latest step it could be recomputed at, and the step after its
    last possible use. A backward read fixes a step; a recomputed reader moves within its own
    window; a view is used as long as its own uses last."""
    window: dict[str, tuple[int, int, int]] = {}
    for name in reversed(recomputable):  # users come later in joint order
        direct, users = reads[name], forward_users[name]
        earliest = min(direct + [window[u][0] for u, _ in users])
        latest = min(direct) if direct else max(window[u][1] for u, _ in users)
        last_use = max([s + 1 for s in direct] + [window[u][2] if alias else window[u][1] + 1
                                                  for u, alias in users])
        window[name] = (earliest, latest, last_use)
    return window


def _needed_forward_values(graph: JointGraph, step_of: dict[str, int],
                           always_kept) -> tuple[list[str], set[str]]:
    """Forward values that backward may recompute (reached from a backward step through values
    that are not always kept), in joint order, and the always-kept values it reaches."""
    seen: set[str] = set()
    kept: set[str] = set()
    stack = [i for name in step_of for i in graph[name].inputs]
    while stack:
        name = stack.pop()
        if name in seen or name in kept or graph[name].phase is not Phase.FORWARD:
            continue
        if always_kept(graph[name]):
            kept.add(name)
            continue
        seen.add(name)
        stack.extend(graph[name].inputs)
    return sorted(seen, key=graph.index.__getitem__), kept


def _aliases(graph: JointGraph, a: str, b: str) -> bool:
    return bool(set(graph[a].storages) & set(graph[b].storages))


def _cp_model(model: KeepModel, capacity: int, times: dict[str, float], ties: dict[str, str],
              hint: tuple[set[str], set[str]] | None):
    from ortools.sat.python import cp_model

    cp = cp_model.CpModel()
    keep = {name: cp.NewBoolVar(f"keep_{name}") for name in model.keep_first
            if name not in model.coarsened}
    recompute = {name: cp.NewBoolVar(f"r_{name}") for name in model.recompute_bytes}
    start, end, kept_end = {}, {}, {}
    for name, (earliest, latest, last_use) in model.window.items():
        start[name] = cp.NewIntVar(earliest, model.step_count, f"T_{name}")
        end[name] = cp.NewIntVar(earliest + 1, last_use, f"E'_{name}")
        if name in keep:
            kept_end[name] = cp.NewIntVar(model.forward_count,
                                          max(model.forward_count, last_use), f"E_{name}")
    for name, r in recompute.items():
        kept = keep.get(name, 0)
        cp.Add(r + kept <= 1)
        for step in model.backward_reads[name]:
            cp.Add(r + kept >= 1)
            cp.Add(end[name] >= step + 1).OnlyEnforceIf(r)
            if name in keep:
                cp.Add(kept_end[name] >= step + 1).OnlyEnforceIf(keep[name])
        for user, alias in model.forward_users[name]:
            ru = recompute[user]
            cp.Add(r + kept >= ru)
            read_until = end[user] if alias else start[user] + 1
            cp.Add(end[name] >= read_until).OnlyEnforceIf([r, ru])
            if name in keep:
                cp.Add(kept_end[name] >= read_until).OnlyEnforceIf([keep[name], ru])
    for name in recompute:  # T: exactly the first read, so that E' covers every later one
        read_at = list(model.backward_reads[name])
        for user, _ in model.forward_users[name]:
            read = cp.NewIntVar(model.window[user][0], model.step_count, f"read_{name}_{user}")
            cp.Add(read == start[user]).OnlyEnforceIf(recompute[user])
            cp.Add(read == model.step_count).OnlyEnforceIf(recompute[user].Not())
            read_at.append(read)
        cp.AddMinEquality(start[name], read_at)
    for name, representative in ties.items():
        if name in keep and representative in keep:
            cp.Add(keep[name] == keep[representative])
    intervals, demands = [], []
    for name, r in recompute.items():
        if model.recompute_bytes[name]:
            size = cp.NewIntVar(1, model.step_count, f"size_R_{name}")
            intervals.append(cp.NewOptionalIntervalVar(start[name], size, end[name], r, f"R_{name}"))
            demands.append(model.recompute_bytes[name])
    for name, k in keep.items():
        first, nbytes = model.keep_first[name]
        size = cp.NewIntVar(0, model.step_count, f"size_K_{name}")
        intervals.append(cp.NewOptionalIntervalVar(first, size, kept_end[name], k, f"K_{name}"))
        demands.append(nbytes)
    for first, stop, nbytes in _runs(model.base):
        intervals.append(cp.NewFixedSizeIntervalVar(first, stop - first, f"base_{first}"))
        demands.append(nbytes)
    cp.AddCumulative(intervals, demands, capacity)
    _add_sure_memory(cp, model, capacity, keep, recompute)
    cp.Minimize(sum(r * round(times.get(name, 0.0) * _NANOSECONDS)
                    for name, r in recompute.items()))
    if hint is not None:
        values = _hint_values(model, *hint)
        for index, proto in enumerate(cp.Proto().variables):
            if proto.name in values:
                cp.AddHint(cp.GetIntVarFromProtoIndex(index), values[proto.name])
    return cp, keep


def _hint_values(model: KeepModel, kept: set[str], recomputed: set[str]) -> dict[str, int]:
    """Every variable's value, by name, for a given keep and recompute set: T and E as the
    program would have them."""
    values: dict[str, int] = {}
    for name in reversed(list(model.recompute_bytes)):
        first, last = model.step_count, model.forward_count
        for step in model.backward_reads[name]:
            first, last = min(first, step), max(last, step + 1)
        for user, alias in model.forward_users[name]:
            read = values[f"T_{user}"] if user in recomputed else model.step_count
            values[f"read_{name}_{user}"] = read
            if user in recomputed:
                first = min(first, read)
                last = max(last, values[f"E'_{user}"] if alias else read + 1)
        present = name in recomputed
        values[f"r_{name}"] = int(present)
        values[f"T_{name}"] = first
        values[f"E'_{name}"] = last if present else model.window[name][0] + 1
        values[f"size_R_{name}"] = last - first if present else 1
        if name in model.keep_first:
            values[f"keep_{name}"] = int(name in kept)
            values[f"E_{name}"] = last
            values[f"size_K_{name}"] = last - model.keep_first[name][0]
    return values


def _add_sure_memory(cp, model: KeepModel, capacity: int, keep, recompute,
                     count: int = _SURE_STEPS) -> None:
    """Redundant linear constraints that give the LP relaxation (and so the gap) a bound: at a
    sample of steps, the bytes surely held there fit. A kept value is surely held from its last
    forward use to its last backward read, a recomputed one between its first and last reads."""
    sure: list[tuple[int, int, int, object]] = []  # (first, stop, bytes, literal)
    for name, k in keep.items():
        first, nbytes = model.keep_first[name]
        stop = max([model.forward_count] + [s + 1 for s in model.backward_reads[name]])
        sure.append((first, stop, nbytes, k))
    for name, r in recompute.items():
        reads = model.backward_reads[name]
        if reads and model.recompute_bytes[name]:
            sure.append((min(reads), max(reads) + 1, model.recompute_bytes[name], r))
    stride = max(1, model.step_count // count)
    for step in range(stride // 2, model.step_count, stride):
        terms = [nbytes * literal for first, stop, nbytes, literal in sure if first <= step < stop]
        if terms:
            cp.Add(sum(terms) <= capacity - max(0, model.base[step]))


def _runs(values: list[int]):
    """(first, stop, value) of each run of equal values."""
    first = 0
    for t in range(1, len(values) + 1):
        if t == len(values) or values[t] != values[first]:
            yield first, t, max(0, values[first])
            first = t


class _Allowance:
    """What is left of the search's limit: wall-clock seconds from ``started``, or CP-SAT's
    deterministic time (``config.deterministic_time``), which the solver reports as it spends."""

    def __init__(self, config: SolverConfig, started: float):
        self.deterministic = config.deterministic_time is not None
        self.limit = config.deterministic_time if self.deterministic else config.time_limit_s
        self.started, self.spent = started, 0.0

    def left(self) -> float:
        return self.limit - (self.spent if self.deterministic else time.perf_counter() - self.started)

    def limit_search(self, parameters, limit: float) -> None:
        if self.deterministic:
            parameters.max_deterministic_time = limit
            parameters.interleave_search = True
        else:
            parameters.max_time_in_seconds = limit

    def count(self, solver) -> None:
        self.spent += solver.response_proto.deterministic_time


def solve(graph: JointGraph, budget_bytes: int, *, config: SolverConfig,
          warm_starts: Sequence[StepSchedule] = ()) -> StepSchedule:
    """Warm-started from the cheapest single-level form of ``warm_starts`` (chen-greedy's plan
    when none are given). First with the decisions of identical blocks tied (a small search),
    then untied from the best plan so far; each phase gets half of the time left."""
    allowance = _Allowance(config, time.perf_counter())
    warm_starts = list(warm_starts) or [chen_greedy.solve(graph, budget_bytes, config=config)]
    model = build_keep_model(graph)
    start = _single_level(graph, model, warm_starts, budget_bytes, config)
    ties = representatives(graph)
    best = start if start.feasible else None
    gap, notes = None, []
    for tied in ((True, False) if ties else (False,)):
        left = allowance.left()
        if left <= 0:
            notes.append("no time left to search")
            break
        hint = model.assignment(graph, (best or start).program.saved)
        if tied:
            hint = model.tied(graph, hint[0], ties)
        schedule, phase_gap = _solve_fitting(graph, model, budget_bytes, hint,
                                             ties if tied else {}, allowance,
                                             left / 2 if tied else left, config, notes)
        if schedule is not None and (best is None or schedule.recompute_s < best.recompute_s):
            best = schedule
        if not tied:
            gap = phase_gap
    if allowance.deterministic:
        notes.append(f"{allowance.spent:.2f} of {allowance.limit:g} units of deterministic time")
    detail = "; ".join(notes)
    fallback = min(warm_starts, key=lambda s: (not s.feasible, s.recompute_s, s.peak_bytes))
    if best is None or best is start or (fallback.feasible and fallback.recompute_s <= best.recompute_s):
        return replace(fallback, method="cpsat", gap=None,
                       detail=f"{fallback.method}'s plan, not improved ({detail})")
    return replace(best, gap=gap, detail=detail)


def _single_level(graph: JointGraph, model: KeepModel, schedules: Sequence[StepSchedule],
                  budget_bytes: int, config: SolverConfig) -> StepSchedule:
    """The cheapest of the schedules' saved sets as single-level programs (the model's form)."""
    programs = {}
    for schedule in schedules:
        kept, _ = model.assignment(graph, schedule.program.saved)
        programs.setdefault(frozenset(kept), build_program(graph, model.fixed_keep | kept))
    options = [evaluate(graph, p, budget_bytes, method="cpsat", config=config)
               for p in programs.values()]
    return min(options, key=lambda s: (not s.feasible, s.recompute_s, s.peak_bytes))


def _solve_fitting(graph: JointGraph, model: KeepModel, budget_bytes: int, hint, ties,
                   allowance: _Allowance, limit: float, config: SolverConfig,
                   notes: list[str]) -> tuple[StepSchedule | None, float | None]:
    """Solve within ``limit`` of the allowance; while the simulator finds the plan over budget,
    lower the capacity by the excess."""
    end = allowance.left() - limit
    capacity = budget_bytes
    for _ in range(_RETRIES + 1):
        left = allowance.left() - end
        if left <= 0:
            break
        schedule, status, gap = _solve_once(graph, model, capacity, budget_bytes, hint, ties,
                                            allowance, left, config)
        notes.append(f"{'tied' if ties else 'untied'} at {capacity} B: {status}")
        if schedule is None:
            break
        if schedule.feasible:
            return schedule, gap
        capacity -= schedule.peak_bytes - budget_bytes
    return None, None


def _solve_once(graph: JointGraph, model: KeepModel, capacity: int, budget_bytes: int, hint,
                ties: dict[str, str], allowance: _Allowance, limit: float,
                config: SolverConfig) -> tuple[StepSchedule | None, str, float | None]:
    from ortools.sat.python import cp_model

    cp, keep = _cp_model(model, capacity, config.node_time_s, ties, hint)
    solver = cp_model.CpSolver()
    allowance.limit_search(solver.parameters, limit)
    solver.parameters.cp_model_probing_level = 0  # probing the cumulative takes minutes at 10^4 values
    solver.parameters.num_workers = config.workers
    solver.parameters.random_seed = config.seed
    status = solver.StatusName(solver.Solve(cp))
    allowance.count(solver)
    if status not in ("OPTIMAL", "FEASIBLE"):
        return None, status, None
    kept = model.fixed_keep | {name for name, k in keep.items() if solver.Value(k)}
    objective, bound = solver.ObjectiveValue(), solver.BestObjectiveBound()
    gap = 0.0 if status == "OPTIMAL" or objective <= 0 else (objective - bound) / objective
    schedule = evaluate(graph, build_program(graph, kept), budget_bytes, method="cpsat",
                        config=config)
    return schedule, status, gap
