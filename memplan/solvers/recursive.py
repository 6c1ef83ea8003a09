"""Multi-level schedules over a chain of stages: a tree says, for each range of stages, how its
backward is reached; :func:`emit` turns the tree into the backward order the executor runs.

The forward order is cut into stages at chosen positions (cuts, see ``segments``). A range of
stages [s, t] is backpropagated in one of three ways:

- ``Leaf(s)``: one stage: recompute what its backward nodes read, then run them;
- ``Keep(s, rest, option)``: recompute stage s keeping everything its backward reads (option 0)
  or one of its leaner keeps (``stage_keeps``), backpropagate ``rest`` (stages s+1..t), then
  stage s, recomputing only what that keep left out;
- ``Split(k, right, left)``: recompute forward up to the cut before stage k and keep only the
  cut, backpropagate ``right`` (k..t), then ``left`` (s..k-1), recomputing from the cut at s.

The right spine of the tree runs during the forward pass itself: what it keeps there is saved
(:func:`spine_keep`), everything else is recomputed in backward, from the nearest value in scope.
Chen et al.'s recursion (``log``) is a tree of bisecting splits; ``chain-dp`` chooses the tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Union

from memplan.graph import JointGraph, Phase
from memplan.program import Program, reading_program
from memplan.solvers.segments import Cuts


@dataclass(frozen=True)
class Leaf:
    stage: int


@dataclass(frozen=True)
class Keep:
    stage: int
    rest: "Tree"
    option: int = 0  # which of the stage's keeps: 0 keeps everything its backward reads


@dataclass(frozen=True)
class Split:
    stage: int  # the first stage of the right part: the cut before it is kept
    right: "Tree"
    left: "Tree"


Tree = Union[Leaf, Keep, Split]


@dataclass(frozen=True)
class Stages:
    """The forward order cut at ``boundaries`` (positions): stage i ends at boundaries[i]."""

    cuts: Cuts
    boundaries: tuple[int, ...]
    groups: tuple[tuple[str, ...], ...]  # backward nodes of each stage, in single-level order
    needs: tuple[frozenset[str], ...]  # forward values each stage's backward nodes read
    keeps: tuple[tuple[frozenset[str], ...], ...] = ()  # per stage, what a Keep option holds

    def kept(self, stage: int, option: int) -> frozenset[str]:
        return self.keeps[stage][option] if option else self.needs[stage]

    @property
    def count(self) -> int:
        return len(self.groups)

    def cut_before(self, stage: int) -> set[str]:
        """The values kept at the cut that starts ``stage`` (empty before the first stage, and
        at ``count``, after the last)."""
        return self.cuts.keep([self.boundaries[stage - 1]]) if 0 < stage < self.count else set()


def make_stages(graph: JointGraph, cuts: Cuts, boundaries: list[int], single_level: Program) -> Stages:
    """Backward nodes per stage: a node belongs to the latest stage among its forward inputs,
    never later than the node before it (backward walks the stages downwards)."""
    stage_of_position = []
    stage = 0
    for p in range(len(cuts.order)):
        stage_of_position.append(stage)
        if stage < len(boundaries) and p == boundaries[stage]:
            stage += 1
    groups: list[list[str]] = [[] for _ in range(len(boundaries) + 1)]
    current = len(boundaries)
    for name in single_level.backward:
        node = graph[name]
        if node.phase is not Phase.BACKWARD:
            continue
        stages = [stage_of_position[cuts.position[i]] for i in node.inputs if i in cuts.position]
        current = min(current, max(stages, default=current))
        groups[current].append(name)
    needs = tuple(frozenset(i for name in group for i in graph[name].inputs
                            if graph[i].phase is Phase.FORWARD) for group in groups)
    return Stages(cuts, tuple(boundaries), tuple(tuple(g) for g in groups), needs)


def spine_keep(stages: Stages, tree: Tree) -> set[str]:
    """What the forward pass keeps when it runs the tree's right spine."""
    keep: set[str] = set()
    while True:
        if isinstance(tree, Split):
            keep |= stages.cut_before(tree.stage)
            tree = tree.right
        elif isinstance(tree, Keep):
            keep |= stages.kept(tree.stage, tree.option)
            tree = tree.rest
        else:
            return keep | stages.needs[tree.stage]


class _Emitter:
    """Builds the backward order, recomputing from the nearest value still in scope."""

    def __init__(self, graph: JointGraph, stages: Stages, saved: frozenset[str], recomputed: list[str]):
        self.graph, self.stages = graph, stages
        self.needed = set(recomputed)  # a cut value nothing in backward needs is not rebuilt
        self.order: list[str] = []
        self.ready = set(saved).union(*({n.name for n in graph.nodes_of(phase)}
                                        for phase in (Phase.PRIMAL, Phase.TANGENT)))

    def materialize(self, names: Iterable[str], scope: set[str]) -> None:
        frontier = [name for name in names if name not in scope and name not in self.ready]
        pending: set[str] = set()
        while frontier:
            name = frontier.pop()
            if name in pending or name in scope or name in self.ready:
                continue
            pending.add(name)
            frontier.extend(self.graph.by_name[name].inputs)
        for name in sorted(pending, key=self.graph.index.__getitem__):
            self.order.append(name)
            scope.add(name)

    def run(self, tree: Tree, scope: set[str]) -> None:
        if isinstance(tree, Leaf):
            scope = set(scope)
            nodes, forward, ready = self.graph.by_name, self.graph.forward_names, self.ready
            for name in self.stages.groups[tree.stage]:
                missing = [i for i in nodes[name].inputs
                           if i in forward and i not in scope and i not in ready]
                if missing:
                    self.materialize(missing, scope)
                self.order.append(name)
                ready.add(name)
        elif isinstance(tree, Keep):
            outer, scope = scope, set(scope)
            kept = self.stages.kept(tree.stage, tree.option)
            self.materialize(kept, scope)
            # a value the keep leaves out is recomputed by the stage's backward, even where
            # computing a kept value passed through it: holding it would free nothing
            scope -= self.stages.needs[tree.stage] - kept
            self.run(tree.rest, scope)
            # and recomputed from what the keep holds, not from what computing the kept values
            # passed through: that would be held across ``rest``
            self.run(Leaf(tree.stage), outer | kept)
        else:
            cut = self.stages.cut_before(tree.stage) & self.needed
            self.materialize(cut, set(scope))
            self.run(tree.right, scope | cut)
            self.run(tree.left, scope | cut)


def emit(graph: JointGraph, stages: Stages, tree: Tree, saved: frozenset[str],
         recomputed: list[str]) -> Program:
    """The program that saves ``saved`` (what backward still reads of it) and backpropagates
    the stages as ``tree`` says."""
    emitter = _Emitter(graph, stages, saved, recomputed)
    emitter.run(tree, set())
    return reading_program(graph, saved, emitter.order)
