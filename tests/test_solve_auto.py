"""``solve_auto`` on large graphs: the fast solvers forked side by side plan as they do one
after another."""

from __future__ import annotations

import gc
import os
from dataclasses import replace

import pytest
import torch

import memplan
from memplan.api import plan_step
from memplan.cost_models import for_device
from memplan.solvers import SolverConfig, registry, solve_auto
from zoo import build

pytestmark = pytest.mark.skipif(registry._cores() < 2,
                                reason="one core: the solvers run one after another")


def densenet40_at_half():
    """DenseNet-40's graph (fewer nodes than ``PARALLEL_MIN_NODES``), half its unplanned peak,
    and the CPU's times."""
    case = build("densenet40")
    plan = memplan.optimize(case.model, "100%", example_inputs=case.args, method="none")
    graph = plan._result().graph
    assert len(graph.nodes) < registry.PARALLEL_MIN_NODES
    return graph, plan.baseline_peak_bytes // 2, SolverConfig(node_time_s=for_device("cpu").times(graph))


def test_forked_solvers_give_the_schedules_they_give_one_after_another(monkeypatch):
    graph, budget, config = densenet40_at_half()
    solve = registry.solve

    def solve_noting_the_process(method, graph, budget_bytes, *, config):
        schedule = solve(method, graph, budget_bytes, config=config)
        return replace(schedule, detail=f"{schedule.detail} (process {os.getpid()})")

    monkeypatch.setattr(registry, "solve", solve_noting_the_process)
    in_turn = solve_auto(graph, budget, config=config)
    monkeypatch.setattr(registry, "PARALLEL_MIN_NODES", len(graph.nodes))
    side_by_side = solve_auto(graph, budget, config=config)
    assert gc.get_freeze_count() == 0  # frozen while they ran, then not

    here = f"(process {os.getpid()})"
    assert all(s.detail.endswith(here) for s in in_turn)
    assert not any(s.detail.endswith(here) for s in side_by_side)
    assert len({s.detail.rsplit("(", 1)[1] for s in side_by_side}) > 1
    summary = lambda s: (s.method, s.feasible, s.peak_bytes, s.recompute_s, s.program,  # noqa: E731
                         s.timeline, s.detail.rsplit(" (", 1)[0])
    assert [summary(s) for s in side_by_side] == [summary(s) for s in in_turn]


def test_a_heap_the_caller_froze_stays_frozen(monkeypatch):
    """Asked of an object the caller froze (a collection walks no frozen object): the freeze
    count also falls when another thread frees a frozen object meanwhile."""
    graph, budget, config = densenet40_at_half()
    monkeypatch.setattr(registry, "PARALLEL_MIN_NODES", len(graph.nodes))
    frozen_by_caller = []
    gc.freeze()
    try:
        solve_auto(graph, budget, config=config)
        assert id(frozen_by_caller) not in {id(o) for o in gc.get_objects()}
    finally:
        gc.unfreeze()


def test_a_budget_in_bytes_plans_as_its_percentage(monkeypatch):
    """In bytes, the unplanned schedule is solved beside the others, not before them."""
    graph, half, config = densenet40_at_half()
    monkeypatch.setattr(registry, "PARALLEL_MIN_NODES", len(graph.nodes))
    by_share, by_bytes = (plan_step(graph, budget, "auto", torch.device("cpu"),
                                    node_time_s=config.node_time_s) for budget in ("50%", half))
    assert by_share.budget_bytes == by_bytes.budget_bytes == half
    summary = lambda s: (s.method, s.feasible, s.peak_bytes, s.program, s.timeline)  # noqa: E731
    assert summary(by_bytes.baseline) == summary(by_share.baseline)
    assert by_bytes.baseline.feasible
    assert [summary(s) for s in by_bytes.alternatives] == [summary(s) for s in by_share.alternatives]
