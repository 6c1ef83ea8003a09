"""Offloading saved values to host memory: the rewritten graphs, the simulator, the placement.

Off CUDA the executor's copies are plain copies and there is no host link to price, so the
planned steps are checked with a stand-in link (``memplan.api.host_link``); what the copies
cost and save on a GPU is measured by ``bench/gpu.py --offload`` and ``bench/diag/offload.py``.
"""

import time
from collections import Counter
from dataclasses import replace

import pytest
from harness import assert_matches_eager, eager_twin
from zoo import build

import memplan
import memplan.api
import memplan.solvers.offload as offload_module
from memplan.liveness import simulate
from memplan.program import Transfer, build_program, candidates, save_more
from memplan.graph import Phase
from memplan.solvers import SolverConfig, solve
import memplan.passes.offload as offload_pass
from memplan.passes.offload import arrived, to_device, to_host
from memplan.solvers.offload import HostLink, improve, offloadable, place_transfers

FAST_LINK = HostLink(bytes_per_s=1e12, min_bytes=0)


@pytest.fixture
def stand_in_link(monkeypatch):
    monkeypatch.setattr(memplan.api, "host_link", lambda device: FAST_LINK)


@pytest.fixture
def copies(monkeypatch):
    """The copies the executed steps make, to or from the host: one shape each."""
    made = []
    copy = offload_pass._copy
    monkeypatch.setattr(offload_pass, "_copy", lambda *a: made.append(a[0].shape) or copy(*a))
    return made


@pytest.mark.parametrize("name, budget", [("gpt2", "60%"), ("bert", "60%"),
                                          ("preact_resnet29", "60%"), ("mlp", "60%"),
                                          ("densenet40", "minimum")])
def test_offloading_plans_match_eager_bitwise(stand_in_link, name, budget):
    """Outputs, gradients, BatchNorm statistics and dropout draws, over two steps."""
    case = build(name)
    eager = eager_twin(case)
    if budget == "minimum":
        with pytest.raises(memplan.InfeasibleBudgetError) as info:
            memplan.optimize(case.model, 1, example_inputs=case.args, example_kwargs=case.kwargs)
        budget = info.value.minimum_bytes
    plan = memplan.optimize(case.model, budget, example_inputs=case.args,
                            example_kwargs=case.kwargs, offload=True)
    assert plan.program.offloaded, "the stand-in link makes offloading pay"
    assert plan.method.endswith("+offload")
    assert f"offloaded         {len(plan.program.offloaded)} values" in plan.report()
    assert_matches_eager(plan, case, eager)
    assert_copies_where_planned(plan)


def assert_copies_where_planned(plan):
    """Each copy back starts right after its ``fetch_after`` step (other copies aside), and each
    device copy is dropped after its ``free_after`` node, or the nearest node before it."""
    step, _ = next(iter(plan.module._steps.values()))
    forward, backward = step.fx_compiled[:2]
    program = plan.program
    fetched_after = {}
    previous = None
    for node in backward.graph.nodes:
        if node.target is to_device:
            fetched_after[node.args[0].name] = previous
        elif node.op in ("call_function", "placeholder"):
            previous = node
    steps = [n for n in backward.graph.nodes if n.op == "call_function" and n.target is not to_device
             and n.target is not arrived]
    forward_nodes = [n.name for n in forward.graph.nodes]
    for transfer in program.offloaded:
        anchor = fetched_after[transfer.name]
        if transfer.fetch_after < 0:
            assert anchor.op == "placeholder"
        else:
            assert anchor is steps[transfer.fetch_after] or anchor.target is arrived
        drop, = [n for n in forward.graph.nodes if n.target is arrived and n.args[1].name == transfer.name]
        before = drop.prev
        while before.target in (to_host, arrived):
            before = before.prev
        expected = next(name for name in reversed(program.forward[:program.forward.index(transfer.free_after) + 1])
                        if name in forward_nodes)
        assert before.name == expected


def test_a_value_dropped_at_a_node_the_forward_graph_erased(stand_in_link, monkeypatch):
    """A forward replays each dropout right after its draw, and a pass erases that replay (the
    draw's own result is read instead): a transfer placed there drops its value before it."""
    place = offload_module.place_transfers

    def at_replays(graph, program, names, times, link):
        transfers, waits = place(graph, program, names, times, link)
        replays = [name for name in program.forward if graph[name].op == "memplan.dropout_replay.default"]
        moved = []
        for transfer in transfers:
            start = program.forward.index(transfer.name)
            later = [r for r in replays if program.forward.index(r) > start]
            moved.append(replace(transfer, free_after=later[0]) if later else transfer)
        return tuple(moved), waits

    monkeypatch.setattr(offload_module, "place_transfers", at_replays)
    case = build("mlp")
    eager = eager_twin(case)
    plan = memplan.optimize(case.model, "60%", example_inputs=case.args, offload=True)
    replays = {t.free_after for t in plan.program.offloaded if "dropout_replay" in t.free_after}
    assert replays, "some transfers are placed at replays"
    assert_matches_eager(plan, case, eager)
    assert_copies_where_planned(plan)


def _mlp_graph():
    case = build("mlp")
    plan = memplan.optimize(case.model, "100%", example_inputs=case.args, method="none")
    return plan._result().graph


def test_an_offloaded_value_leaves_the_device_between_its_transfers():
    """Against keeping it: exactly its bytes fewer after its last forward use, until it is
    fetched just before its first backward use; the same bytes everywhere else."""
    graph = _mlp_graph()
    kept = build_program(graph, [n.name for n in candidates(graph)])
    name = next(n for n in kept.saved if offloadable(graph, n, min_bytes=0))
    nbytes = graph.storages[graph[name].storages[0]].nbytes
    first_use = next(j for j, step in enumerate(kept.backward) if name in graph[step].inputs)
    offloaded = Transfer(name, free_after=name, fetch_after=first_use - 1)
    moved = simulate(graph, replace(kept, offloaded=(offloaded,)))
    base = simulate(graph, kept)
    last_forward_use = max(i for i, step in enumerate(kept.forward)
                           if step == name or name in graph[step].inputs)
    away = set(range(last_forward_use + 1, len(kept.forward) + first_use))
    assert base.steps == moved.steps
    for step, (before, after) in enumerate(zip(base.live_bytes, moved.live_bytes)):
        assert before - after == (nbytes if step in away else 0), base.steps[step]


def test_a_value_is_dropped_at_the_first_node_that_ends_after_its_copy():
    """Every node takes 1 ms and the link 2.5 ms per value: a value made by node p is on the
    host 3.5 ms after node p starts, so the device drops it after node p + 3 (ending at p + 4)."""
    graph = _mlp_graph()
    program = build_program(graph, [n.name for n in candidates(graph)])
    times = {name: 1e-3 for name in (*program.forward, *program.backward)}
    def first_use(name):
        return next(j for j, step in enumerate(program.backward) if name in graph[step].inputs)

    name = next(n for n in program.saved if offloadable(graph, n, min_bytes=0)
                and program.forward.index(n) + 3 < len(program.forward) and first_use(n) >= 4)
    nbytes = graph.storages[graph[name].storages[0]].nbytes
    link = HostLink(bytes_per_s=nbytes / 2.5e-3, latency_s=0.0)
    (transfer,), waits = place_transfers(graph, program, [name], times, link)
    assert transfer.free_after == program.forward[program.forward.index(name) + 3]
    # Copied back after the last step that ends 2.5 ms or more before its first use starts:
    # step u - 4 ends 3 ms before it, step u - 3 only 2 ms.
    assert transfer.fetch_after == first_use(name) - 4
    assert waits == 0.0


def test_a_slow_link_makes_the_device_wait():
    graph = _mlp_graph()
    program = build_program(graph, [n.name for n in candidates(graph)])
    times = {name: 1e-3 for name in (*program.forward, *program.backward)}
    names = [n for n in program.saved if offloadable(graph, n, min_bytes=0)]
    slow = HostLink(bytes_per_s=1.0, latency_s=0.0, min_bytes=0)
    _transfers, waits = place_transfers(graph, program, names, times, slow)
    total = sum(graph.storages[graph[n].storages[0]].nbytes for n in names)  # seconds, each way
    compute = 1e-3 * (len(program.forward) + len(program.backward))
    assert 2 * total - compute <= waits <= 2 * total  # only compute hides any of the copies


@pytest.mark.parametrize("fraction", [0.9, 0.7, 0.5])
def test_offloading_fits_the_budget_and_never_costs_more(fraction):
    case = build("gpt2")
    plan = memplan.optimize(case.model, "100%", example_inputs=case.args, method="none")
    graph = plan._result().graph
    config = SolverConfig(node_time_s={n.name: 1e-4 for n in graph.nodes})
    budget = int(plan.baseline_peak_bytes * fraction)
    base = solve("chain-dp", graph, budget, config=config)
    assert base.feasible
    offloading = improve(graph, base, budget, config=config,
                         link=HostLink(bytes_per_s=1e9, min_bytes=0))
    assert simulate(graph, offloading.program).peak_bytes == offloading.peak_bytes <= budget
    assert offloading.recompute_s + offloading.stall_s <= base.recompute_s
    if fraction < 0.9:  # the chain-dp plan recomputes enough for copies to pay
        assert offloading.program.offloaded
    late = improve(graph, base, budget, config=config, link=HostLink(bytes_per_s=1e9, min_bytes=0),
                   deadline=time.perf_counter())  # past its time limit: nothing tried, and said
    assert late.program == base.program and "cut at its time limit after 0 prefixes" in late.detail


def test_offload_is_refused_where_it_cannot_run():
    case = build("mlp")
    with pytest.raises(ValueError, match="CUDA device"):
        memplan.optimize(case.model, "60%", example_inputs=case.args, offload=True)
    with pytest.raises(ValueError, match="CUDA graphs"):
        memplan.optimize(case.model, "60%", example_inputs=case.args, offload=True,
                         cuda_graphs=True)


@pytest.mark.parametrize("name, rtol", [("gpt2", 1e-5), ("preact_resnet29", 1e-2)])
def test_compiled_offloading_plans_match_eager(stand_in_link, copies, name, rtol):
    """Inductor compiles the segments between the copies, which run as they are: two copies
    per offloaded value per step, and the step eager's to inductor's rounding. The ResNet's
    plan compiled without offload already differs from eager by up to 4e-3 of a gradient's
    norm on this CPU (mkldnn convolutions on inductor's layouts); a wrong value is off by 1."""
    pytest.importorskip("torch._inductor.compile_fx")
    from test_compile import assert_steps_match
    case = build(name)
    eager = eager_twin(case)
    plan = memplan.optimize(case.model, "60%", example_inputs=case.args,
                            example_kwargs=case.kwargs, offload=True, compile=True)
    assert plan.program.offloaded, "the stand-in link makes offloading pay"
    assert_steps_match(plan.module, case, eager, rtol)
    assert len(copies) == 2 * 2 * len(plan.program.offloaded)  # two steps


def test_the_torch_compile_backend_offloads(monkeypatch, copies):
    """Each graph's copies follow its own plan; a graph compiled without grad plans nothing."""
    pytest.importorskip("torch._inductor.compile_fx")
    import sys
    import torch
    from test_compile import assert_steps_match
    # memplan.backend names the function; its module prices the link
    monkeypatch.setattr(sys.modules["memplan.backend"], "host_link", lambda device: FAST_LINK)
    case = build("mlp")
    eager = eager_twin(case)
    memplan_backend = memplan.backend(0.95, offload=True)
    compiled = torch.compile(case.model, backend=memplan_backend, fullgraph=True)
    case.model.eval()
    with torch.no_grad():  # an inference graph: compiled, nothing planned, nothing copied
        compiled(*case.args, **case.kwargs)
    case.model.train()
    assert not memplan_backend.plans and not copies
    assert_steps_match(compiled, case, eager)
    offloaded = memplan_backend.plans[-1].chosen.program.offloaded
    assert offloaded and len(copies) == 2 * 2 * len(offloaded)  # two steps


def _recomputed_twice(graph, program):
    counts = Counter(program.backward)
    return {name for name, n in counts.items() if n > 1 and graph[name].phase is Phase.FORWARD}


def test_saving_more_keeps_a_multi_level_programs_levels():
    """Each step reads values saved, given (primals, tangents) or computed earlier in backward;
    the newly saved values are no longer recomputed (nor saved, where another of them was all
    that read one), what only they needed is gone, and values recomputed twice elsewhere still
    are."""
    case = build("gpt2")
    plan = memplan.optimize(case.model, "60%", example_inputs=case.args,
                            example_kwargs=case.kwargs, method="log")
    graph, program = plan._result().graph, plan.program
    twice = _recomputed_twice(graph, program)
    assert twice and program != build_program(graph, program.saved), "a multi-level program"
    names = [n for n in program.recomputed if n not in twice and offloadable(graph, n, 0)][:3]
    saved_more = save_more(graph, program, names)
    assert set(names) & set(saved_more.saved) and not set(names) & set(saved_more.backward)
    assert _recomputed_twice(graph, saved_more)
    computed = set()
    for step in saved_more.backward:
        for value in graph[step].inputs:
            assert (value in computed or value in saved_more.saved
                    or graph[value].phase in (Phase.PRIMAL, Phase.TANGENT)), (step, value)
        computed.add(step)
    reads = {value for step in saved_more.backward for value in graph[step].inputs}
    assert set(saved_more.saved) <= reads
    assert len(saved_more.backward) < len(program.backward)


def test_an_offloading_multi_level_plan_matches_eager_bitwise(monkeypatch):
    """With a slow link the ResNet's log plan gains most with its levels kept."""
    monkeypatch.setattr(memplan.api, "host_link", lambda device: HostLink(5e8, min_bytes=0))
    case = build("preact_resnet29")
    eager = eager_twin(case)
    plan = memplan.optimize(case.model, "60%", example_inputs=case.args,
                            example_kwargs=case.kwargs, method="log", offload=True)
    assert plan.method == "log+offload" and plan.program.offloaded
    assert _recomputed_twice(plan._result().graph, plan.program), "its levels are kept"
    assert_matches_eager(plan, case, eager)
    assert_copies_where_planned(plan)