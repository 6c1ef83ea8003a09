"""The chain DP's leaner keeps: what a keep says its stage's backward recomputes is what the
program recomputes, plans built on them equal eager, and they never make a plan dearer."""

from __future__ import annotations

import pytest

import memplan
from memplan.cost_models import for_device
from memplan.program import complete_saved_set
from memplan.solvers import chain_dp
from memplan.solvers.base import SolverConfig
from memplan.solvers.blocks import block_of, representatives
from memplan.solvers.recursive import Keep, Leaf, Split, Tree, emit, spine_keep
from memplan.solvers.registry import solve
from memplan.solvers.stage_keeps import stage_keeps
from harness import assert_matches_eager, assert_measured_peak, eager_twin
from zoo import build


def captured(name: str):
    case = build(name)
    graph = memplan.optimize(case.model, "100%", example_inputs=case.args,
                             example_kwargs=case.kwargs, method="none")._result().graph
    return graph, for_device("cpu").times(graph)


def keep_chain(first: int, last: int, lean_stage: int, option: int) -> Tree:
    """Stages first..last each kept whole, but ``lean_stage``, kept by ``option``."""
    tree: Tree = Leaf(last)
    for stage in range(last - 1, first - 1, -1):
        tree = Keep(stage, tree, option if stage == lean_stage else 0)
    return tree


def recomputed_by_leaf(graph, stages, program, stage: int) -> list[str]:
    """The forward nodes run between the backward of the stage after ``stage`` and the end of
    ``stage``'s own: what its leaf recomputes."""
    order = program.backward
    after = max(i for i, name in enumerate(order) if name in stages.groups[stage + 1])
    end = max(i for i, name in enumerate(order) if name in stages.groups[stage])
    return [name for name in order[after + 1:end] if name in graph.forward_names]


def uses_leaner_keep(tree: Tree) -> bool:
    if isinstance(tree, Keep):
        return tree.option > 0 or uses_leaner_keep(tree.rest)
    if isinstance(tree, Leaf):
        return False
    return uses_leaner_keep(tree.right) or uses_leaner_keep(tree.left)


@pytest.mark.parametrize("name", ["gpt2", "densenet40"])
def test_a_keep_recomputes_what_it_says(name):
    """Kept on the forward pass (the right spine) or after a split (recomputed from the cut),
    a stage's leaner keep holds its values (and what they are recomputed from), and its
    backward recomputes, once each, at most the keep's ``recomputed`` (less where another
    stage's keep holds a value it counted), and mostly exactly that: not less because what
    computing the kept values passed through is still held."""
    graph, times = captured(name)
    stages, _ = chain_dp.chain_trees(graph, SolverConfig(node_time_s=times))
    keeps = stage_keeps(graph, stages, times, SolverConfig().dp_keeps)
    last = stages.count - 1
    exact = checked = 0
    for stage in (s for s in range(1, last - 1) if stages.groups[s] and stages.groups[s + 1]):
        for option, keep in enumerate(keeps[stage][1:], start=1):
            # what the next stage's input cut holds anyway, dropping would free nothing
            assert keep.kept >= stages.needs[stage] & stages.cut_before(stage + 1)
            on_spine = keep_chain(0, last, stage, option)
            after_split = Split(stage + 2, right=keep_chain(stage + 2, last, -1, 0),
                                left=keep_chain(0, stage + 1, stage, option))
            for tree in (on_spine, after_split):
                saved, recomputed = complete_saved_set(graph, spine_keep(stages, tree))
                program = emit(graph, stages, tree, saved, recomputed)
                again = recomputed_by_leaf(graph, stages, program, stage)
                assert len(again) == len(set(again)) and set(again) <= keep.recomputed
                exact += set(again) == keep.recomputed
                checked += 1
    assert checked >= 10 and exact >= checked * 0.9  # all of them, on both models, today


@pytest.mark.parametrize("name", ["gpt2", "preact_resnet29", "densenet40"])
def test_plans_on_leaner_keeps_equal_eager(name, monkeypatch):
    """Only trees with a leaner keep are offered: dropout masks, BatchNorm statistics,
    outputs and gradients still match eager, and the peak its prediction."""
    trees_of = chain_dp.chain_trees

    def leaner_only(graph, config):
        stages, trees = trees_of(graph, config)
        return stages, [tree for tree in trees if uses_leaner_keep(tree)]

    monkeypatch.setattr(chain_dp, "chain_trees", leaner_only)
    case = build(name)
    eager = eager_twin(case)
    plan = memplan.optimize(case.model, "100%", example_inputs=case.args,
                            example_kwargs=case.kwargs, method="chain-dp")
    assert plan.program.recomputed
    assert_matches_eager(plan, case, eager)
    assert_measured_peak(plan, case)


def test_leaner_keeps_never_cost_more_and_often_less():
    """The trees of the chain without leaner keeps stay candidates, so a plan never gets dearer,
    nor a budget infeasible; on three models, six of the fifteen budgets get cheaper."""
    cheaper = 0
    for name in ("gpt2", "densenet40", "llama"):
        graph, times = captured(name)
        peak = solve("none", graph, 2**62, config=SolverConfig(node_time_s=times)).peak_bytes
        for fraction in (0.8, 0.6, 0.5, 0.4, 0.3):
            budget = int(peak * fraction)
            lean, whole = (solve("chain-dp", graph, budget,
                                 config=SolverConfig(node_time_s=times, dp_keeps=keeps))
                           for keeps in (SolverConfig().dp_keeps, 0))
            assert lean.feasible >= whole.feasible
            if whole.feasible:
                assert lean.peak_bytes <= budget and lean.recompute_s <= whole.recompute_s
                cheaper += lean.recompute_s < whole.recompute_s
    assert cheaper >= 4


def test_identical_blocks_of_a_stage_are_kept_alike():
    """A keep drops the same values from each of its stage's identical blocks, or none, so that
    their segments compile alike on the compiled path (ResNet-1001 at 50%: 62 compilations, 87
    with keeps cut mid-way through a run of equal ratios)."""
    graph, times = captured("preact_resnet29")
    representative = representatives(graph)  # a block's node -> the first identical block's
    stages, _ = chain_dp.chain_trees(graph, SolverConfig(node_time_s=times, dp_stages=3))
    compared = 0
    for stage, options in enumerate(stages.keeps):
        reads: dict[str, set[str]] = {}  # block instance -> what this stage's backward reads of it
        for name in stages.needs[stage]:
            block = block_of(graph[name].module_path)
            if block is not None:
                reads.setdefault(block[0], set()).add(name)
        alike: dict[frozenset[str], list[set[str]]] = {}  # identical blocks, read alike
        for names in reads.values():
            alike.setdefault(frozenset(representative.get(n, n) for n in names), []).append(names)
        for kept in options[1:]:
            for instances in (group for group in alike.values() if len(group) > 1):
                dropped = {frozenset(representative.get(n, n) for n in names - kept)
                           for names in instances}
                assert len(dropped) == 1, f"stage {stage} drops {dropped}"
                compared += len(instances)
    assert compared >= 10
