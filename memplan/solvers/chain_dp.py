"""``chain-dp``: the optimal multi-level schedule of a chain of stages, by dynamic programming.

Beaumont, Herrmann, Pallez, Shilova, "Optimal checkpointing for heterogeneous chains" (rotor).
The forward order is cut at its local minima of crossing bytes (coarsened to at most
``config.dp_stages`` stages); each stage s has a forward time uf[s], a backward time ub[s], an
input cut of x[s] bytes, the gradients it produces, and ways to keep it while later stages
backpropagate (``stage_keeps``): everything its backward reads, or leaner sets of kept[s, o]
bytes whose left-out values its backward recomputes in r[s, o] seconds. C(s, t, m)
is the least time to backpropagate stages s..t within m memory slots, the input cut of s and the
incoming gradient counted in m:

    C(s, s, m) = uf[s] + ub[s]                              if m >= leaf[s]          (Leaf)
    C(s, t, m) = min( min over keeps o of s:
                          uf[s] + ub[s] + r[s, o] + C(s+1, t, m - kept[s, o])          (Keep)
                      min over s < k <= t of  uf[s..k-1] + C(k, t, m - x[s])
                                                        + C(s, k-1, m - grad[k..t]) ) (Split)

Memory is discretised into slots, sizes rounded up, once for each count in ``config.dp_slots``.
The DP's memory model is an estimate; the simulator is the judge: the distinct optimal trees at
``config.dp_candidates`` slot counts spread evenly over the feasible range, and as many spread
geometrically, of the chain with its leaner keeps and of the chain without them, become
programs, and the cheapest program whose simulated peak fits wins. The
candidates do not depend on the budget, so a larger budget never gives a slower schedule, nor a
smaller one a larger peak.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from memplan.errors import InternalError
from memplan.graph import Category, JointGraph
from memplan.program import Program, build_program, complete_saved_set
from memplan.solvers.base import (SolverConfig, StepSchedule, candidate, evaluate_all, in_cost_order,
                                  least_peak, that_may_fit)
from memplan.solvers.recursive import Keep, Leaf, Split, Stages, Tree, emit, make_stages, spine_keep
from memplan.solvers.segments import Cuts, find_cuts, local_minima
from memplan.solvers.stage_keeps import StageKeep, stage_keeps

_KEEP = -1  # choice of Keep option 0; option o is _KEEP - o
_INFEASIBLE = math.inf


def coarsen(cuts: Cuts, boundaries: list[int], stage_count: int) -> list[int]:
    """At most ``stage_count - 1`` boundaries: in each window of an even split of the forward
    order, the candidate with the fewest crossing bytes (ties: the latest)."""
    if len(boundaries) < stage_count:
        return boundaries
    n = len(cuts.order)
    chosen: list[int] = []
    for i in range(1, stage_count):
        low, high = (i - 0.5) * n / stage_count, (i + 0.5) * n / stage_count
        window = [p for p in boundaries if low <= p < high]
        if window:
            best = min(window, key=lambda p: (cuts.crossing_bytes[p], -p))
            if not chosen or best > chosen[-1]:
                chosen.append(best)
    return chosen


def _bytes(graph: JointGraph, names: set[str] | frozenset[str]) -> int:
    resident = graph._primal_storages
    storages = {s for name in names for s in graph[name].storages if s not in resident}
    return sum(graph.storages[s].nbytes for s in storages)


@dataclass(frozen=True)
class ChainModel:
    """The DP's view of the stages, in bytes and seconds: all that its tables depend on."""

    forward_s: tuple[float, ...]
    backward_s: tuple[float, ...]
    cut_bytes: tuple[int, ...]  # per stage, and the empty cut after the last
    kept_bytes: tuple[tuple[int, ...], ...]  # per stage and keep; keep 0 holds everything
    keep_s: tuple[tuple[float, ...], ...]  # per stage and keep: what its backward recomputes
    leaf_bytes: tuple[int, ...]
    grad_bytes: tuple[int, ...]

    @property
    def ceiling_bytes(self) -> int:
        """Enough memory for the tree that keeps everything (a chain of Keeps of option 0)."""
        return sum(k[0] for k in self.kept_bytes) + max(self.leaf_bytes) + sum(self.grad_bytes)

    def keeping_everything(self) -> ChainModel:
        """The chain without leaner keeps. Its trees are candidates too: the DP's memory model
        is coarse, and with leaner keeps its optimal trees are other trees, whose simulated
        peaks can all be above a budget that one of these fits (ResNet-50 at 30%)."""
        return replace(self, kept_bytes=tuple(k[:1] for k in self.kept_bytes),
                       keep_s=tuple(k[:1] for k in self.keep_s))


def chain_model(graph: JointGraph, stages: Stages, times: Mapping[str, float],
                keeps: tuple[tuple[StageKeep, ...], ...]) -> ChainModel:
    count = stages.count
    position_stage = []
    for stage, end in enumerate((*stages.boundaries, len(stages.cuts.order) - 1)):
        position_stage += [stage] * (end + 1 - len(position_stage))
    forward_s = [0.0] * count
    for p, name in enumerate(stages.cuts.order):
        forward_s[position_stage[p]] += times.get(name, 0.0)
    backward_s = [sum(times.get(n, 0.0) for n in group) for group in stages.groups]
    cuts = [stages.cut_before(s) for s in range(count + 1)]
    cut_bytes = [_bytes(graph, c) for c in cuts]
    kept_bytes, keep_s, leaf_bytes, grad_bytes = [], [], [], []
    for s in range(count):
        kept_bytes.append(tuple(_bytes(graph, (keep.kept | cuts[s]) - cuts[s + 1])
                                for keep in keeps[s]))
        keep_s.append(tuple(math.fsum(times.get(n, 0.0) for n in keep.recomputed)
                            for keep in keeps[s]))
        held = set(stages.needs[s]) | cuts[s]
        grads = sum(graph.storages[i].nbytes for name in stages.groups[s]
                    for i in graph.allocates[name]
                    if graph.storages[i].category is Category.GRADIENT)
        grad_bytes.append(grads)
        # the stage's values, its output cut, and the gradients flowing in and out
        leaf_bytes.append(_bytes(graph, held | cuts[s + 1]) + cut_bytes[s + 1] + cut_bytes[s]
                          + grads)
    return ChainModel(tuple(forward_s), tuple(backward_s), tuple(cut_bytes), tuple(kept_bytes),
                      tuple(keep_s), tuple(leaf_bytes), tuple(grad_bytes))


def _shifted(costs: np.ndarray, slots: int) -> np.ndarray:
    """costs[..., m - slots] at each m: the cost with ``slots`` fewer slots available."""
    out = np.full_like(costs, _INFEASIBLE)
    slots = min(slots, costs.shape[-1])
    out[..., slots:] = costs[..., :costs.shape[-1] - slots]
    return out


class ChainDP:
    """Tables C[s, t] (cost per slot count) and the choice that reached each entry.

    For each (s, t) every split point k is costed at once, as rows of one array; the first k of
    least cost wins, and only if cheaper than every Keep (of which the first of least cost
    wins). A choice below zero is Keep option ``-1 - choice``."""

    def __init__(self, model: ChainModel, slot_count: int):
        count = len(model.forward_s)
        self.count = count
        self.unit = max(1, math.ceil(model.ceiling_bytes / slot_count))
        up = lambda nbytes: math.ceil(nbytes / self.unit)  # noqa: E731
        x = self.x = [up(b) for b in model.cut_bytes]
        kept = self.kept = [[up(b) for b in options] for options in model.kept_bytes]
        leaf = [up(b) for b in model.leaf_bytes]
        grad_after = self.grad_after = np.array([up(sum(model.grad_bytes[k:]))
                                                 for k in range(count + 1)])
        forward_from = np.array([sum(model.forward_s[:k]) for k in range(count + 1)])
        slots = np.arange(slot_count + 1)
        cost = self.cost = np.full((count, count, len(slots)), _INFEASIBLE)
        choice = self.choice = np.full((count, count, len(slots)), _KEEP, dtype=np.int32)
        # per stage and keep, at each slot count m: where C(s+1, t) is read (m - kept), whether
        # that is below zero slots, and the stage's own time with that keep
        keep_reads = []
        for s in range(count):
            cost[s, s] = np.where(slots >= leaf[s], model.forward_s[s] + model.backward_s[s],
                                  _INFEASIBLE)
            index = slots - np.array(kept[s])[:, None]
            own_s = model.forward_s[s] + model.backward_s[s] + np.array(model.keep_s[s])[:, None]
            keep_reads.append((index.clip(min=0), index < 0, own_s))
        for length in range(2, count + 1):
            for s in range(count - length + 1):
                t = s + length - 1
                # grad of stages s+1..t are held while stage s runs its backward
                leaf_fits = slots - (grad_after[s + 1] - grad_after[t + 1]) >= leaf[s]
                index, below, own_s = keep_reads[s]
                keeps = cost[s + 1, t][index]
                keeps[below] = _INFEASIBLE
                keeps += own_s
                option = keeps.argmin(axis=0)
                keep = np.where(leaf_fits, keeps[option, slots], _INFEASIBLE)
                keep_choice = _KEEP - option
                # split[i]: the cost of splitting at k = s + 1 + i, summed in the order
                # forward[s..k-1] + C(k, t, m - x[s]) + C(s, k-1, m - grads held)
                k = np.arange(s + 1, t + 1)
                split = _shifted(cost[s + 1:t + 1, t], x[s])
                split += (forward_from[k] - forward_from[s])[:, None]
                for i, held in enumerate((grad_after[k] - grad_after[t + 1]).clip(max=len(slots))):
                    split[i, :held] = _INFEASIBLE
                    split[i, held:] += cost[s, s + i, :len(slots) - held]
                first_least = split.argmin(axis=0)
                least = split[first_least, slots]
                better = least < keep
                cost[s, t] = np.where(better, least, keep)
                choice[s, t] = np.where(better, k[first_least], keep_choice)

    def tree(self, s: int, t: int, slots: int) -> Tree:
        """The optimal tree for stages s..t within ``slots`` (a finite entry of the table)."""
        if s == t:
            return Leaf(s)
        k = int(self.choice[s, t][slots])
        if k <= _KEEP:
            option = _KEEP - k
            return Keep(s, self.tree(s + 1, t, slots - self.kept[s][option]), option)
        held_grads = self.grad_after[k] - self.grad_after[t + 1]
        return Split(k, right=self.tree(k, t, slots - self.x[s]),
                     left=self.tree(s, k - 1, slots - held_grads))


def candidate_trees(dp: ChainDP, count: int) -> list[Tree]:
    """The distinct optimal trees at ``count`` slot counts spread evenly over the feasible ones and
    ``count`` spread geometrically, the cheapest (in the DP's model) first.

    Geometrically too, because budgets that need much recomputation sit near the least feasible
    memory, far below the keep-everything ceiling (GPT-2 medium's 6.8 GiB of 53 GiB), where an
    even spread has few candidates."""
    costs = dp.cost[0, dp.count - 1]
    feasible = np.flatnonzero(costs < _INFEASIBLE)
    even = np.linspace(0, len(feasible) - 1, count).round().astype(int)
    geometric = np.searchsorted(feasible, np.geomspace(max(feasible[0], 1), feasible[-1], count))
    picked = feasible[np.unique(np.concatenate([even, geometric.clip(max=len(feasible) - 1)]))]
    trees: dict[Tree, None] = {}
    for slots in sorted(picked, key=lambda m: (costs[m], -m)):
        trees.setdefault(dp.tree(0, dp.count - 1, int(slots)), None)
    return list(trees)


@functools.lru_cache(maxsize=8)
def optimal_trees(model: ChainModel, slot_count: int, count: int) -> tuple[Tree, ...]:
    """``candidate_trees`` of the model's DP, kept for the next plan of the same chain (at another
    budget, or as CP-SAT's warm start): the tables take seconds to build."""
    return tuple(candidate_trees(ChainDP(model, slot_count), count))


def _emit_saving(graph: JointGraph, stages: Stages, tree: Tree, saved: frozenset[str],
                 recomputed: list[str]) -> Program:
    """``emit``, checked to save exactly ``saved``: candidates that cannot fit are skipped by
    that set's forward end, unbuilt."""
    program = emit(graph, stages, tree, saved, recomputed)
    if set(program.saved) != saved:
        raise InternalError("a chain-dp program saves other values than its tree's completed "
                            f"saved set: {sorted(saved ^ set(program.saved))[:10]}")
    return program


def chain_trees(graph: JointGraph, config: SolverConfig) -> tuple[Stages, list[Tree]]:
    """The graph's stages, with their keeps, and the DP's distinct candidate trees over them."""
    cuts = find_cuts(graph)
    boundaries = coarsen(cuts, local_minima(cuts), config.dp_stages)
    stages = make_stages(graph, cuts, boundaries, build_program(graph, cuts.keep(boundaries)))
    keeps = stage_keeps(graph, stages, config.node_time_s, config.dp_keeps)
    stages = replace(stages, keeps=tuple(tuple(keep.kept for keep in options) for options in keeps))
    model = chain_model(graph, stages, config.node_time_s, keeps)
    trees = [tree for chain in (model, model.keeping_everything()) for slot_count in config.dp_slots
             for tree in optimal_trees(chain, slot_count, config.dp_candidates)]
    return stages, list(dict.fromkeys(trees))


def solve(graph: JointGraph, budget_bytes: int, *, config: SolverConfig) -> StepSchedule:
    stages, trees = chain_trees(graph, config)
    times = config.node_time_s
    candidates = []
    for tree in trees:
        saved, recomputed = complete_saved_set(graph, spine_keep(stages, tree))
        # The program saves exactly ``saved``, and computes each of ``recomputed`` at least once.
        candidates.append(candidate(saved, math.fsum(times.get(name, 0.0) for name in recomputed),
                                    functools.partial(_emit_saving, graph, stages, tree, saved,
                                                      recomputed)))
    # Cheapest first, an order independent of the budget: the first that fits is the answer.
    schedules = evaluate_all(graph, in_cost_order(graph, that_may_fit(graph, candidates, budget_bytes),
                                                  times),
                             budget_bytes, method="chain-dp", config=config, first_fit=True)
    if not schedules:
        return least_peak(graph, candidates, budget_bytes, method="chain-dp", config=config)
    return schedules[0]
