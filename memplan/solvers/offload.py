"""Offload: saved values that wait in host memory instead of being recomputed.

A value copied to the host as it is made, and back ahead of its first use in backward, costs no
recomputation, only time on the host link, which runs beside compute on a stream of its own. The
link is slow beside the device (55 GB/s on the lent H200, ``bench/results/host_link_h200.md``),
so only part of a step's recomputation can be replaced: the values that cost the most to
recompute per byte (attention, matrix products) go first.

``improve`` starts from a keep/recompute schedule and offloads a prefix of its recomputed values,
ranked so; each prefix is placed on the link's timeline (``place_transfers``) and simulated, and
the fitting one with the least predicted time is kept. Placement follows the predicted compute
times: a value's device copy is dropped at the first forward node that ends after its copy to
the host does, and its copy back starts as late as lets it arrive by its first use, the copies
going one after another in each direction. Where the link falls behind, the device waits; the
wait is predicted and counted.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from memplan.graph import JointGraph, Phase
from memplan.liveness import forward_end_bytes
from memplan.program import Program, Transfer, build_program, save_more
from memplan.solvers.base import SolverConfig, StepSchedule, evaluate

PREFIXES = 16  # prefix lengths tried on a first pass, and again between the best one's neighbours


@dataclass(frozen=True)
class HostLink:
    bytes_per_s: float  # each way
    latency_s: float = 10e-6  # per copy, on the device
    host_s: float = 0.0  # per value, on the host: its four calls of the executor
    min_bytes: int = 1 << 20  # smaller values cost their host time more than they save

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


def offloadable(graph: JointGraph, name: str, min_bytes: int) -> bool:
    """A forward tensor that fills its one storage, its own, large enough to be worth a copy."""
    node = graph[name]
    return (node.phase is Phase.FORWARD and node.dense and len(node.storages) == 1
            and graph.allocates[name] == node.storages and name not in graph.forward_outputs
            and graph.storages[node.storages[0]].nbytes >= min_bytes)


def place_transfers(graph: JointGraph, program: Program, names: Sequence[str],
                    times: Mapping[str, float], link: HostLink) -> tuple[tuple[Transfer, ...], float]:
    """Where each value's device copy ends and its copy back starts; and the predicted waits."""
    nbytes = {name: graph.storages[graph[name].storages[0]].nbytes for name in names}
    position = {name: i for i, name in enumerate(program.forward)}
    forward_ends = _ends(times, program.forward)
    forward_s = forward_ends[-1] if forward_ends else 0.0
    link_free = 0.0
    free_after: dict[str, str] = {}
    for name in sorted(names, key=position.__getitem__):
        link_free = max(forward_ends[position[name]], link_free) + link.seconds(nbytes[name])
        first_done = min(bisect.bisect_left(forward_ends, link_free), len(forward_ends) - 1)
        free_after[name] = program.forward[max(first_done, position[name])]
    forward_wait = max(0.0, link_free - forward_s)

    first_use = {}
    for j, step in enumerate(program.backward):
        for src in graph[step].inputs:
            first_use.setdefault(src, j)
    backward_ends = _ends(times, program.backward)
    starts = [0.0, *backward_ends]
    by_use = sorted(names, key=first_use.__getitem__)
    fetch_after: dict[str, int] = {}
    latest_start = math.inf
    for name in reversed(by_use):  # as late as possible, the link taking one copy at a time
        latest_start = min(starts[first_use[name]], latest_start) - link.seconds(nbytes[name])
        issued = bisect.bisect_right(backward_ends, latest_start) - 1
        fetch_after[name] = min(issued, first_use[name] - 1)

    backward_wait = _backward_waits(graph, program, fetch_after, first_use, nbytes, times, link)
    transfers = tuple(Transfer(name, free_after[name], fetch_after[name])
                      for name in sorted(names, key=position.__getitem__))
    return transfers, forward_wait + backward_wait + link.host_s * len(names)


def _ends(times: Mapping[str, float], order: Sequence[str]) -> list[float]:
    ends, clock = [], 0.0
    for name in order:
        clock += times.get(name, 0.0)
        ends.append(clock)
    return ends


def _backward_waits(graph: JointGraph, program: Program, fetch_after: Mapping[str, int],
                    first_use: Mapping[str, int], nbytes: Mapping[str, int],
                    times: Mapping[str, float], link: HostLink) -> float:
    """Replay backward with the copies back: a step waits for the values it reads."""
    issued: dict[int, list[str]] = {}
    for name, after in fetch_after.items():
        issued.setdefault(after + 1, []).append(name)
    clock = link_free = waited = 0.0
    arrives: dict[str, float] = {}
    for j, step in enumerate(program.backward):
        for name in sorted(issued.get(j, ()), key=first_use.__getitem__):  # as the executor
            link_free = max(clock, link_free) + link.seconds(nbytes[name])
            arrives[name] = link_free
        for src in graph[step].inputs:
            if arrives.get(src, 0.0) > clock:
                waited += arrives[src] - clock
                clock = arrives[src]
        clock += times.get(step, 0.0)
    return waited


def with_offload(graph: JointGraph, levels: Program | None, keep: set[str], names: Sequence[str],
                 budget_bytes: int, *, method: str, config: SolverConfig,
                 link: HostLink) -> StepSchedule | None:
    """The schedule that keeps ``keep`` on the device and ``names`` on the host: the multi-level
    program ``levels`` with them saved (``save_more``), or without one, the single-level program
    of that saved set. None where the forward alone ends above the budget
    (``forward_end_bytes``), without simulating it."""
    program = (build_program(graph, keep | set(names)) if levels is None
               else save_more(graph, levels, keep | set(names)))
    saved = set(program.saved)
    names = [name for name in names if name in saved]
    transfers, wait_s = place_transfers(graph, program, names, config.node_time_s, link)
    program = replace(program, offloaded=transfers)
    if forward_end_bytes(graph, program.saved, program.offloaded) > budget_bytes:
        return None
    schedule = evaluate(graph, program, budget_bytes, method=method, config=config)
    return replace(schedule, stall_s=wait_s)


def improve(graph: JointGraph, schedule: StepSchedule, budget_bytes: int, *,
            config: SolverConfig, link: HostLink, deadline: float = math.inf) -> StepSchedule:
    """``schedule`` with a prefix of its recomputed values offloaded, where that fits the budget
    and is predicted faster; else ``schedule`` itself. No prefix is tried after ``deadline``
    (``time.perf_counter()``): on ResNet-1001 each is a simulation of 26,000 nodes.

    The prefixes are tried on the single-level program of the new saved set and, where
    ``schedule`` is multi-level, on it with its levels kept (``save_more``). Rebuilt, a
    multi-level program recomputes each value once: ResNet-1001's chain-dp plan at 30% of its
    peak would peak at 3.41 GiB instead of 2.70 before any offload; GPT-2 medium's log plan at
    6.8 GiB did best rebuilt (bench/results/offload_h200.md)."""
    started = time.perf_counter()
    times = config.node_time_s
    keep = set(schedule.program.saved)
    # A storage that a kept view or an output holds stays on the device: copying it saves nothing.
    held = {s for name in (*keep, *graph.forward_outputs) for s in graph[name].storages}
    ranked = sorted((name for name in schedule.program.recomputed
                     if offloadable(graph, name, link.min_bytes) and times.get(name, 0.0) > 0
                     and graph[name].storages[0] not in held),
                    key=lambda name: (-_time_per_byte(graph, times, name), graph.index[name]))
    method = f"{schedule.method}+offload"
    tried, cut = 0, False  # prefixes simulated; whether the deadline left some untried

    def cost(s: StepSchedule | None) -> float:
        return s.recompute_s + s.stall_s if s is not None and s.feasible else math.inf

    def search(levels: Program | None) -> StepSchedule | None:
        nonlocal tried, cut
        schedules: dict[int, StepSchedule | None] = {}  # None: its forward ends over the budget

        def attempt(count: int) -> None:
            nonlocal cut
            if count in schedules:
                return
            if time.perf_counter() >= deadline:
                cut = True
                return
            schedules[count] = with_offload(graph, levels, keep, ranked[:count], budget_bytes,
                                            method=method, config=config, link=link)

        counts = sorted({round(len(ranked) * i / PREFIXES) for i in range(1, PREFIXES + 1)} - {0})
        for count in counts:
            attempt(count)
        if schedules:
            best = min(schedules, key=lambda c: cost(schedules[c]))
            below = max((c for c in counts if c < best), default=0)
            above = min((c for c in counts if c > best), default=best)
            for count in sorted({round(below + (above - below) * i / PREFIXES)
                                 for i in range(1, PREFIXES)} - {0}):
                attempt(count)
        tried += len(schedules)
        fitting = [s for s in schedules.values() if s is not None and s.feasible]
        if not fitting:
            return None
        best_schedule = min(fitting, key=cost)
        kept_more, stopped = _keep_more(graph, levels, best_schedule, budget_bytes,
                                        config=config, link=link, deadline=deadline)
        cut = cut or stopped
        return min(best_schedule, kept_more, key=cost)

    # Where the deadline binds (large graphs), a multi-level start gains most with its levels.
    multi_level = schedule.program != build_program(graph, keep)
    found = [s for s in map(search, [schedule.program, None] if multi_level else [None])
             if s is not None]
    best_schedule = min(found, key=cost, default=None)
    note = f"offload search cut at its time limit after {tried} prefixes" if cut else ""
    if best_schedule is None or cost(best_schedule) >= schedule.recompute_s + schedule.stall_s:
        return replace(schedule, detail="; ".join(filter(None, (schedule.detail, note))))
    return replace(best_schedule,
                   solve_time_s=schedule.solve_time_s + time.perf_counter() - started,
                   detail=note)


def _keep_more(graph: JointGraph, levels: Program | None, schedule: StepSchedule,
               budget_bytes: int, *, config: SolverConfig, link: HostLink,
               deadline: float) -> tuple[StepSchedule, bool]:
    """Offloading frees device memory the keep/recompute plan had counted on: keep the longest
    prefix of what is still recomputed, ranked by time per byte, that fits (by bisection).
    Also says whether the deadline cut the bisection."""
    times = config.node_time_s
    ranked = sorted((name for name in schedule.program.recomputed
                     if graph[name].phase is Phase.FORWARD and graph[name].is_tensor
                     and times.get(name, 0.0) > 0),
                    key=lambda name: (-_time_per_byte(graph, times, name), graph.index[name]))
    keep = set(schedule.program.saved)
    offloaded = [t.name for t in schedule.program.offloaded]
    best, low, high = schedule, 0, len(ranked)
    while low < high:
        if time.perf_counter() >= deadline:
            return best, True
        count = (low + high + 1) // 2
        attempt = with_offload(graph, levels, keep | set(ranked[:count]), offloaded, budget_bytes,
                               method=schedule.method, config=config, link=link)
        if attempt is not None and attempt.feasible:
            best, low = attempt, count
        else:
            high = count - 1
    return best, False


def _time_per_byte(graph: JointGraph, times: Mapping[str, float], name: str) -> float:
    """Recompute time per byte the value allocates: what keeping or offloading it buys."""
    return times.get(name, 0.0) / max(1, sum(graph.storages[s].nbytes for s in graph.allocates[name]))
