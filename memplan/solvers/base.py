"""What every solver returns, and the one way a program is costed."""

from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from memplan.errors import InternalError
from memplan.graph import JointGraph, Phase
from memplan.liveness import Timeline, forward_end_bytes, simulate
from memplan.program import Program, complete_saved_set, program_saving


@dataclass(frozen=True)
class SolverConfig:
    node_time_s: Mapping[str, float] = field(default_factory=dict)  # from a cost model
    grid_points: int = 24  # segment budgets tried by the Chen greedy grid search
    dp_stages: int = 64  # the chain DP coarsens the forward order to at most this many stages
    # and discretises memory into each of these many slots: a unit is the keep-everything peak
    # over the count, and a stage's bytes are rounded up to it. 128 alone was coarse for GPT-2
    # medium (a 0.41 GiB unit, 13x its layers' 32 MiB inputs: +80.8% predicted at a 6.8 GiB
    # budget where checkpointing every layer costs +30.6%); 4096 alone lost DenseNet plans that
    # the coarser, more cautious model found. The candidates of both are simulated.
    dp_slots: tuple[int, ...] = (128, 4096)
    dp_candidates: int = 32  # slot counts per spread and discretisation whose trees are simulated
    dp_keeps: int = 8  # leaner ways to keep each stage the chain DP may choose (``stage_keeps``)
    time_limit_s: float = 30.0  # CP-SAT's wall-clock limit, heuristic warm start included
    # CP-SAT's limit in its deterministic time instead: reproducible, however long it takes
    deterministic_time: float | None = None
    workers: int = 2  # CP-SAT search workers (see cpsat on reproducibility)
    seed: int = 0


@dataclass(frozen=True)
class StepSchedule:
    """A solver's answer, with its evidence."""

    method: str
    program: Program
    timeline: Timeline
    recompute_s: float  # predicted time spent recomputing
    step_s: float  # predicted time of the step without recomputation
    solve_time_s: float = 0.0
    feasible: bool = True
    reason: str = ""
    gap: float | None = None  # relative optimality gap, for solvers that can bound it
    detail: str = ""  # how the solver got there
    stall_s: float = 0.0  # predicted time the device waits for offloaded values' copies

    @property
    def peak_bytes(self) -> int:
        return self.timeline.peak_bytes

    @property
    def overhead(self) -> float:
        return (self.recompute_s + self.stall_s) / self.step_s if self.step_s else 0.0


def recompute_seconds(graph: JointGraph, program: Program, times: Mapping[str, float]) -> float:
    """Exactly rounded (``fsum``), so that it is never below a bound summed from a subset."""
    forward = graph.forward_names
    return math.fsum(times.get(name, 0.0) for name in program.backward if name in forward)


@dataclass(frozen=True)
class Candidate:
    """A program not built yet. Building one takes a tenth of a second on ResNet-1001, and
    most of a budget's candidates are never simulated."""

    saved: frozenset[str]  # exactly what the program saves: its forward end bounds its peak
    least_s: float  # never above the program's recompute time
    build: Callable[[], Program]  # builds it once


def candidate(saved: frozenset[str], least_s: float, build: Callable[[], Program]) -> Candidate:
    return Candidate(saved, least_s, functools.cache(build))


def single_level(graph: JointGraph, keeps: Iterable[Iterable[str]],
                 times: Mapping[str, float]) -> list[Candidate]:
    """The single-level programs of the distinct completed saved sets of ``keeps``, in their
    order. Each recomputes once the values it does not save: its time is known unbuilt."""
    candidates: dict[frozenset[str], Candidate] = {}
    for keep in keeps:
        saved, recomputed = complete_saved_set(graph, keep)
        if saved not in candidates:
            candidates[saved] = candidate(saved, math.fsum(times.get(name, 0.0) for name in recomputed),
                                          functools.partial(program_saving, graph, saved))
    return list(candidates.values())


def that_may_fit(graph: JointGraph, candidates: Iterable[Candidate], budget_bytes: int) -> list[Candidate]:
    """The candidates whose forward alone does not end above the budget (``forward_end_bytes``)."""
    return [c for c in candidates if forward_end_bytes(graph, c.saved) <= budget_bytes]


def in_cost_order(graph: JointGraph, candidates: Sequence[Candidate],
                  times: Mapping[str, float]) -> Iterator[Program]:
    """The distinct programs of ``candidates`` by recompute time (ties: the earliest candidate),
    each yielded once no unbuilt candidate could give a cheaper one, or one as cheap from an
    earlier candidate: a consumer that stops at the first program that fits builds few."""
    unbuilt = sorted(range(len(candidates)), key=lambda i: (candidates[i].least_s, i))
    built: list[tuple[float, int, Program]] = []  # a heap
    yielded: set[Program] = set()
    next_unbuilt = 0
    while next_unbuilt < len(unbuilt) or built:
        while next_unbuilt < len(unbuilt) and (not built or (
                candidates[unbuilt[next_unbuilt]].least_s, unbuilt[next_unbuilt]) < built[0][:2]):
            i = unbuilt[next_unbuilt]
            next_unbuilt += 1
            program = candidates[i].build()
            heapq.heappush(built, (recompute_seconds(graph, program, times), i, program))
        _, _, program = heapq.heappop(built)
        if program not in yielded:
            yielded.add(program)
            yield program


def evaluate(graph: JointGraph, program: Program, budget_bytes: int, *, method: str,
             config: SolverConfig, timeline: Timeline | None = None) -> StepSchedule:
    """``timeline``: the program's, where the caller has simulated it already."""
    times = config.node_time_s
    step_s = sum(times.get(n.name, 0.0) for n in graph.nodes
                 if n.phase in (Phase.FORWARD, Phase.BACKWARD))
    recompute_s = recompute_seconds(graph, program, times)
    timeline = timeline or simulate(graph, program)
    fits = timeline.peak_bytes <= budget_bytes
    return StepSchedule(method=method, program=program, timeline=timeline,
                        recompute_s=recompute_s, step_s=step_s, feasible=fits,
                        reason="" if fits else
                        f"peak {timeline.peak_bytes} B exceeds the budget {budget_bytes} B")


def at_budget(graph: JointGraph, schedule: StepSchedule, budget_bytes: int, *,
              config: SolverConfig) -> StepSchedule:
    """The schedule judged against another budget, without simulating it again."""
    return replace(evaluate(graph, schedule.program, budget_bytes, method=schedule.method,
                            config=config, timeline=schedule.timeline),
                   solve_time_s=schedule.solve_time_s)


def evaluate_all(graph: JointGraph, programs: Iterable[Program], budget_bytes: int, *,
                 method: str, config: SolverConfig, first_fit: bool = False) -> list[StepSchedule]:
    """The schedules of ``programs`` that fit, in their order. A program whose forward alone
    ends above the budget (``forward_end_bytes``) is not simulated, and the others only until a
    step goes above it: most of a low budget's candidates cannot fit, and simulating is most of
    a solver's time. With ``first_fit``, the first schedule that fits is the only one returned."""
    schedules = []
    for program in programs:
        if forward_end_bytes(graph, program.saved, program.offloaded) > budget_bytes:
            continue
        timeline = simulate(graph, program, limit_bytes=budget_bytes)
        if timeline is None:
            continue
        schedules.append(evaluate(graph, program, budget_bytes, method=method, config=config,
                                  timeline=timeline))
        if first_fit:
            break
    return schedules


def least_peak(graph: JointGraph, candidates: Sequence[Candidate], budget_bytes: int, *,
               method: str, config: SolverConfig) -> StepSchedule:
    """For a budget no candidate fits, the schedule with the smallest peak, which names the
    least budget (ties: the least recompute time, then the earliest candidate). Candidates are
    simulated in the order of their forward ends (``forward_end_bytes``, below their peaks),
    each until a step goes above the smallest peak so far, and none once their forward end is
    above it: simulating every candidate whole took chain-dp 432 s on ResNet-1001's compiled
    graph (2-core CPU)."""
    ends = [forward_end_bytes(graph, c.saved) for c in candidates]
    best: tuple[int, float, int] | None = None
    found: StepSchedule | None = None
    for i in sorted(range(len(candidates)), key=lambda i: (ends[i], i)):
        if best is not None and ends[i] > best[0]:
            break
        program = candidates[i].build()
        timeline = simulate(graph, program, limit_bytes=best[0] if best else None)
        if timeline is None:
            continue
        schedule = evaluate(graph, program, budget_bytes, method=method, config=config,
                            timeline=timeline)
        if best is None or (schedule.peak_bytes, schedule.recompute_s, i) < best:
            best, found = (schedule.peak_bytes, schedule.recompute_s, i), schedule
    if found is None:
        raise InternalError(f"{method} has no candidate program to simulate")
    return found
