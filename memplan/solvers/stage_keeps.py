"""Leaner ways to keep a stage: what its backward reads, less the values cheapest to recompute.

Keeping all a stage's backward reads or only its input cut are the chain DP's two extremes.
Between them, a transformer layer's backward reads its attention's dropout output (the
softmax times a kept mask: a pointwise product as large as the softmax) and its MLP's
activations, which cost a few pointwise kernels to recompute, beside the softmax and the
matrix products, which cost more. Rockmate (Zhao et al., ICML 2023) gives each block of a chain
several such plans, found by an ILP per block; here they are found greedily, in a fixed order.

Values that share storage are dropped together (a group): dropping one view of a buffer frees
nothing while another is kept. Each step drops the group that frees the most bytes per second of
recomputation, where recomputing walks back to the kept values, the stage's input cut and what
earlier drops already recompute. Of the sequence of leaner sets, ``count`` are offered: the first
to free each of 1/count, 2/count, ... of what could be freed, taken where its run of drops at
one ratio ends. Identical blocks tie, so a stage's blocks are then kept alike and compile alike:
ResNet-1001's compiled step at 50% (CPU) needs 62 compilations instead of 87.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

from memplan.graph import JointGraph, Phase
from memplan.solvers.recursive import Stages


@dataclass(frozen=True)
class StageKeep:
    """One way to keep a stage: the values held while later stages backpropagate, and the
    forward nodes its backward then recomputes."""

    kept: frozenset[str]
    recomputed: frozenset[str]


def stage_keeps(graph: JointGraph, stages: Stages, times: Mapping[str, float],
                count: int) -> tuple[tuple[StageKeep, ...], ...]:
    """Per stage, keeping everything its backward reads first, then up to ``count`` leaner keeps."""
    return tuple(_keeps(graph, stages.needs[s], stages.cut_before(s), stages.cut_before(s + 1),
                        times, count)
                 for s in range(stages.count))


def _groups(graph: JointGraph, names: list[str]) -> list[tuple[str, ...]]:
    """``names`` joined where they share a storage, each group in joint order."""
    owner: dict[int, int] = {}
    parent = list(range(len(names)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, name in enumerate(names):
        for storage in graph[name].storages:
            if storage in owner:
                parent[root(i)] = root(owner[storage])
            else:
                owner[storage] = i
    members: dict[int, list[str]] = {}
    for i, name in enumerate(names):
        members.setdefault(root(i), []).append(name)
    return [tuple(group) for group in members.values()]


def _keeps(graph: JointGraph, needs: frozenset[str], cut: set[str], next_cut: set[str],
           times: Mapping[str, float], count: int) -> tuple[StageKeep, ...]:
    """The keeps of a stage whose input cut is ``cut`` and output cut ``next_cut``: values of
    either are held by the chain whatever the stage keeps, so they are never dropped, and a
    storage one of them refers to is never freed."""
    index, nodes = graph.index, graph.by_name
    everything = StageKeep(frozenset(needs), frozenset())
    if count <= 0:
        return (everything,)
    unrecomputable = graph.unrecomputable
    droppable = sorted((n for n in needs if n not in cut and n not in next_cut
                        and n not in unrecomputable and nodes[n].phase is Phase.FORWARD),
                       key=index.__getitem__)
    groups = _groups(graph, droppable)
    # a storage is freed when no kept value and no cut value refers to it
    references = Counter(s for name in needs | cut | next_cut for s in nodes[name].storages)
    resident = graph._primal_storages
    kept = set(needs)
    recomputed: set[str] = set()

    def recomputation(group: tuple[str, ...]) -> tuple[set[str], set[str]]:
        """Forward nodes that recomputing ``group`` adds, the group's values dropped, and the
        values it reads that are held anyway: the input cut's, and those never recomputed."""
        added: set[str] = set()
        reads: set[str] = set()
        stack = list(group)
        while stack:
            name = stack.pop()
            if name in cut or (name in unrecomputable and name not in group):
                reads.add(name)
            elif not (name in added or name in recomputed or nodes[name].phase is not Phase.FORWARD
                      or (name in kept and name not in group)):
                added.add(name)
                stack.extend(nodes[name].inputs)
        return added, reads

    def freed(group: tuple[str, ...]) -> int:
        own = Counter(s for name in group for s in nodes[name].storages)
        return sum(graph.storages[s].nbytes for s, n in own.items()
                   if references[s] == n and s not in resident)

    steps: list[tuple[int, float, StageKeep]] = []
    total = 0
    while groups:
        def gain(group: tuple[str, ...]) -> tuple[float, int]:
            seconds = math.fsum(times.get(n, 0.0) for n in recomputation(group)[0])
            return (freed(group) / seconds if seconds else math.inf, -index[group[0]])

        best = max(groups, key=gain)
        groups.remove(best)
        bytes_freed = freed(best)
        if not bytes_freed:
            continue
        added, reads = recomputation(best)
        seconds = math.fsum(times.get(n, 0.0) for n in added)
        if seconds:
            ratio = bytes_freed / seconds
        else:  # free to recompute (a view): it joins the run of drops it follows
            ratio = steps[-1][1] if steps else math.inf
        recomputed |= added
        kept.difference_update(best)
        # what the recomputation reads of those is held with the keep (the chain DP counts the
        # input cut as held; a random draw is always saved): on the forward pass, it is saved
        references.update(s for name in reads - kept - cut - next_cut for s in nodes[name].storages)
        kept |= reads
        references.subtract(s for name in best for s in nodes[name].storages)
        total += bytes_freed
        steps.append((total, ratio, StageKeep(frozenset(kept), frozenset(recomputed))))
    # A keep is offered where a run of drops at one ratio ends: the same value of each of a
    # stage's identical blocks is dropped in all of them or in none, so that they compile alike.
    ends = [step for step, after in zip(steps, steps[1:] + [None]) if after is None or after[1] != step[1]]
    offered: dict[StageKeep, None] = {}
    for i in range(1, count + 1):
        reached = next((keep for freed_bytes, _, keep in ends if freed_bytes * count >= total * i), None)
        if reached is not None:
            offered.setdefault(reached, None)
    return (everything, *offered)
