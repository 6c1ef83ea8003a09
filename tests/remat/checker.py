"""Independent replay of a schedule: shares no code with memplan.remat's solvers or schedule module.

Reads only the graph's data fields and the plan's events, re-derives every rule from the
Checkmate/Moccasin semantics and returns (peak_bytes, total_cost).
"""


def replay_check(graph, plan, budget_bytes):
    assert plan.feasible, plan.reason
    size = dict(zip(graph.names, graph.bytes))
    cost_of = dict(zip(graph.names, graph.time))
    inputs = {name: [graph.names[p] for p in ps] for name, ps in zip(graph.names, graph.preds)}
    live, live_bytes, peak, cost, seen = set(), 0, 0, 0, set()
    for kind, name in plan.events:
        assert name in size, f"unknown node {name}"
        if kind == "compute":
            for inp in inputs[name]:
                assert inp in live, f"{name} computed while its input {inp} is not resident"
            assert name not in live, f"{name} computed while already resident"
            live.add(name)
            live_bytes += size[name]
            peak = max(peak, live_bytes)
            cost += cost_of[name]
            seen.add(name)
        elif kind == "free":
            assert name in live, f"free of {name}, which is not resident"
            live.remove(name)
            live_bytes -= size[name]
        else:
            raise AssertionError(f"unknown event kind {kind}")
    assert seen == set(graph.names), f"never computed: {sorted(set(graph.names) - seen)}"
    assert peak <= budget_bytes, f"peak {peak} > budget {budget_bytes}"
    assert peak == plan.peak_bytes, f"reported peak {plan.peak_bytes} != replayed {peak}"
    assert abs(cost - plan.total_cost) <= 1e-9 * max(1, abs(cost)), f"reported cost {plan.total_cost} != {cost}"
    return peak, cost
