import pytest

from memplan.remat import make_graph, methods, minimum_bytes, solve

from checker import replay_check
from generators import MIB, chain, diamond, no_recompute_peak, random_dag, unet

ALL = ["no-recompute", "greedy-belady", "greedy-dtr", "cpsat", "brute-force", "auto"]
CASES = {
    "chain8": chain(8),
    "diamond": diamond(),
    "unet4": unet(4),
    "random9": random_dag(9, seed=3),
    "zero_bytes": chain(4, sizes=[0, 0, 0, 0]),
    "mixed_zero": chain(5, sizes=[2, 0, 3, 0, 1]),
}


def test_registry_names():
    assert set(ALL) - {"auto"} <= set(methods())


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fraction", [1.0, 0.75])
def test_every_plan_replays(method, case, fraction):
    g = CASES[case]
    budget = int(no_recompute_peak(g) * fraction)
    plan = solve(g, budget, method=method, time_limit_s=10)
    if not plan.feasible:
        assert plan.reason and plan.events == ()
        assert method == "no-recompute" or not solve(g, budget, method="brute-force").feasible
        return
    peak, cost = replay_check(g, plan, budget)
    assert cost >= sum(g.time)
    assert plan.gap is not None and 0.0 <= plan.gap < 1.0


@pytest.mark.parametrize("method", ALL)
def test_empty_graph(method):
    g = make_graph([], [], [], [])
    plan = solve(g, 0, method=method)
    assert plan.feasible and plan.events == () and plan.peak_bytes == 0 and plan.total_cost == 0


@pytest.mark.parametrize("method", ALL)
def test_zero_budget(method):
    assert solve(chain(3, sizes=[0, 0, 0]), 0, method=method).feasible
    plan = solve(chain(3), 0, method=method)
    assert not plan.feasible and "budget 0 B" in plan.reason


def test_bad_arguments():
    with pytest.raises(ValueError, match="budget_bytes"):
        solve(chain(2), -1)
    with pytest.raises(ValueError, match="budget_bytes"):
        solve(chain(2), 1.5)
    with pytest.raises(ValueError, match="unknown method"):
        solve(chain(2), 10, method="gurobi")
    with pytest.raises(ValueError, match="Graph"):
        solve({"a": []}, 10)
    with pytest.raises(ValueError, match="cannot solve"):
        solve(chain(13), 10**9, method="brute-force")


def test_minimum_bytes_is_the_floor():
    g = diamond()  # d needs b (2 MiB) + c (1) + itself (1)
    assert minimum_bytes(g) == (4 * MIB, 3)
    assert solve(g, 4 * MIB, method="brute-force").feasible
    assert not solve(g, 4 * MIB - 1, method="brute-force").feasible
