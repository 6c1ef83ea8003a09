"""``memplan.optimize``: capture, plan under a budget, and hand back a drop-in module."""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from memplan import report as report_module
from memplan.budget import is_relative, parse_budget
from memplan.capture import CapturedStep, capture, device_of
from memplan.cost_models import check_cost_model, for_device, node_times
from memplan.cuda_graphs import check_dropout, check_inputs, held_bytes
from memplan.errors import InfeasibleBudgetError
from memplan.executor import PlannedModule
from memplan.graph import JointGraph
from memplan.program import Program
from memplan.sac import PlanPolicy
from memplan.solvers import SOLVERS, SolverConfig, StepSchedule, solve, solve_auto
from memplan.solvers.base import at_budget
from memplan.solvers.offload import HostLink, improve

METHODS = ("auto", *SOLVERS)

# On CUDA, measured peaks ran up to 1.25% above the simulated ones (an H200, DenseNet-BC-100,
# bench/results/core_h200_densenet_cpsat.md; compiled, 1.2%: fused_kernels_h200.md): allocator
# and library memory the simulator does not see. Plans on CUDA are made for the budget less this
# headroom, so that the measured peak fits.
CUDA_HEADROOM = 0.015


def headroom_bytes(budget_bytes: int, device: torch.device) -> int:
    return math.ceil(budget_bytes * CUDA_HEADROOM) if device.type == "cuda" else 0


def budget_for_peak(peak_bytes: int, device: torch.device) -> int:
    """The least budget whose plan may have this predicted peak."""
    if device.type != "cuda":
        return peak_bytes
    budget = math.ceil(peak_bytes / (1 - CUDA_HEADROOM))
    while budget - headroom_bytes(budget, device) < peak_bytes:
        budget += 1
    return budget


@dataclass
class PlanResult:
    """The plan for one input signature, with its evidence."""

    graph: JointGraph
    budget_bytes: int
    baseline: StepSchedule
    chosen: StepSchedule
    alternatives: list[StepSchedule]
    device: str
    headroom_bytes: int = 0  # kept free of the plan on CUDA (see CUDA_HEADROOM)
    graphs_bytes: int = 0  # held by CUDA graphs beside the plan (``cuda_graphs.held_bytes``)

    @property
    def predicted_peak_bytes(self) -> int:
        return self.chosen.peak_bytes + self.graphs_bytes


def _free_device_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free


def host_link(device: torch.device) -> HostLink:
    """The device's link to pinned host memory, as the offload planner prices it."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    rates = for_device(device.type, name).rates
    if not rates.host_link_bytes_per_s:
        raise ValueError(f"memplan: offload=True moves saved values from a CUDA device to host "
                         f"memory; the model and its inputs are on {device}. Move them to a "
                         "CUDA device, or leave offload off")
    # four executor calls per value (to_host, arrived, to_device, arrived), each an op's dispatch
    return HostLink(rates.host_link_bytes_per_s, host_s=4 * rates.dispatch_s)


def plan_step(graph: JointGraph, budget: Any, method: str, device: torch.device, *,
              node_time_s: dict[str, float], time_limit_s: float = 30.0,
              deterministic_time: float | None = None,
              graphs_bytes: int = 0, link: HostLink | None = None) -> PlanResult:
    """Solve for one captured graph: the cheapest schedule whose simulated peak fits, beside
    ``graphs_bytes`` of CUDA graphs; with a ``link``, each fitting schedule is also tried with
    some of its recomputation offloaded instead."""
    config = SolverConfig(node_time_s=node_time_s, time_limit_s=time_limit_s,
                          deterministic_time=deterministic_time)
    unlimited = 2**62
    # A budget in bytes leaves ``none`` to run beside the other solvers (2 s on ResNet-1001)
    baseline = (solve("none", graph, unlimited, config=config)
                if method != "auto" or is_relative(budget) else None)
    budget_bytes = parse_budget(budget, baseline and baseline.peak_bytes,
                                free_device_bytes=_free_device_bytes(device))
    headroom = headroom_bytes(budget_bytes, device)
    planned_bytes = budget_bytes - headroom - graphs_bytes
    if method == "auto":
        alternatives = solve_auto(graph, planned_bytes, config=config, unplanned=baseline)
    else:
        alternatives = [solve(method, graph, planned_bytes, config=config)]
    if baseline is None:
        baseline = at_budget(graph, next(s for s in alternatives if s.method == "none"),
                             unlimited, config=config)
    chosen = alternatives[0]
    if not chosen.feasible:
        if method != "auto":
            alternatives = solve_auto(graph, planned_bytes, config=config, unplanned=baseline)
        smallest = min(alternatives, key=lambda s: s.peak_bytes)
        minimum = budget_for_peak(smallest.peak_bytes + graphs_bytes, device)
        raise InfeasibleBudgetError(
            f"no {'schedule' if method == 'auto' else repr(method) + ' schedule'} fits the budget of "
            f"{budget_bytes:,} B: the smallest predicted peak is {smallest.peak_bytes:,} B "
            f"({smallest.method})"
            + (f", and CUDA graphs hold {graphs_bytes:,} B beside it" if graphs_bytes else "")
            + f"; the unplanned peak is {baseline.peak_bytes:,} B. Give a budget of "
            f"at least {minimum:,} B"
            + (f" ({CUDA_HEADROOM:.1%} of a CUDA budget is kept as headroom)" if headroom else "")
            + ("" if method == "auto" else " or use method='auto'") + ", or a smaller batch.",
            minimum_bytes=minimum)
    if link is not None:
        starts: dict[Program, StepSchedule] = {}  # solvers often agree
        for schedule in alternatives:
            if schedule.feasible:
                starts.setdefault(schedule.program, schedule)
        deadline = time.perf_counter() + time_limit_s
        offloading = [improve(graph, s, planned_bytes, config=config, link=link,
                              deadline=deadline) for s in starts.values()]
        best = min(offloading, key=lambda s: s.recompute_s + s.stall_s)
        if best.program.offloaded:
            chosen = best
            alternatives = [best, *alternatives]
        else:  # the chosen plan unchanged, with any note of its search
            chosen = offloading[0]
    return PlanResult(graph=graph, budget_bytes=budget_bytes, baseline=baseline, chosen=chosen,
                      alternatives=alternatives, device=str(device), headroom_bytes=headroom,
                      graphs_bytes=graphs_bytes)


@dataclass
class Plan:
    """What ``optimize`` returns: the module to train with, and the plan's numbers."""

    module: PlannedModule
    budget: Any
    requested_method: str
    results: dict[tuple, PlanResult] = field(default_factory=dict)
    latest: PlanResult | None = None

    def _result(self) -> PlanResult:
        if self.latest is None:
            raise RuntimeError(
                "this plan has not been made yet: pass example_inputs= to memplan.optimize, "
                "or call plan.module once in training mode; it plans at its first call")
        return self.latest

    @property
    def budget_bytes(self) -> int:
        return self._result().budget_bytes

    @property
    def baseline_peak_bytes(self) -> int:
        return self._result().baseline.peak_bytes

    @property
    def predicted_peak_bytes(self) -> int:
        return self._result().predicted_peak_bytes

    @property
    def predicted_overhead(self) -> float:
        return self._result().chosen.overhead

    @property
    def minimum_budget_bytes(self) -> int:
        """The least budget worth asking for: the smallest predicted peak any schedule reached,
        with what CUDA graphs hold beside it, plus the CUDA headroom."""
        result = self._result()
        peak = min(s.peak_bytes for s in result.alternatives) + result.graphs_bytes
        return budget_for_peak(peak, torch.device(result.device))

    @property
    def method(self) -> str:
        return self._result().chosen.method

    @property
    def program(self) -> Program:
        return self._result().chosen.program

    def sac_policy(self) -> PlanPolicy:
        """The plan's saved set as a selective-checkpointing policy, fresh for each checkpoint call:

        >>> context = lambda: create_selective_checkpoint_contexts(plan.sac_policy())  # doctest: +SKIP
        >>> out = checkpoint(model, x, use_reentrant=False, context_fn=context)          # doctest: +SKIP
        """
        result = self._result()
        return PlanPolicy(result.graph, result.chosen.program)

    def report(self) -> str:
        return report_module.render_text(self._result())

    def to_json(self) -> str:
        return json.dumps(report_module.to_dict(self._result()), indent=2)


def optimize(model: torch.nn.Module, budget: Any, *, example_inputs: tuple | None = None,
             example_kwargs: dict | None = None, method: str = "auto", compile: bool = False,
             cuda_graphs: bool = False, offload: bool = False, cost_model: str = "analytic",
             time_limit_s: float = 30.0, deterministic_time: float | None = None) -> Plan:
    """Plan ``model``'s training step to fit ``budget``; see ``memplan.parse_budget`` for forms.

    ``method="auto"`` keeps the cheapest plan of the fast solvers (seconds, reproducible; with
    ``offload``, not where its search is cut at ``time_limit_s``, which the report says);
    ``method="cpsat"`` starts from those and searches for a cheaper plan and its optimality gap,
    within ``time_limit_s`` in all; the offload search (below) stops after ``time_limit_s`` too.
    With ``deterministic_time``, CP-SAT's search stops at that much of its deterministic time
    instead: the same plan for the same model and budget, however long the search takes (the
    offload search still stops at ``time_limit_s``).

    ``cost_model`` prices recomputation: ``"analytic"`` (a roofline, no device time) or
    ``"profile"`` (each distinct op timed once on the device, cached on disk).

    With ``compile=True`` the planned graphs are compiled by inductor instead of run eagerly, in
    segments that keep the planned order between them; the predicted peak counts the kernels
    inductor fuses (``memplan.liveness``), and inductor can exceed it within a segment.

    With ``cuda_graphs=True`` (CUDA only) each input signature's step is captured at its first
    call as a forward and a backward CUDA graph and replayed from then on (``memplan.cuda_graphs``):
    no launch costs, but the step's memory stays reserved between steps, and its outputs and
    gradients are overwritten by the next step (set gradients to None between steps).

    With ``offload=True`` (CUDA; not with ``cuda_graphs``) saved values may also wait in pinned
    host memory instead of being recomputed (``memplan.solvers.offload``): copied out during
    forward and back ahead of their use in backward, on a stream beside compute.

    >>> plan = optimize(model, budget="60%", example_inputs=(x,))   # doctest: +SKIP
    >>> loss_fn(plan.module(x), y).backward()                       # doctest: +SKIP
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {list(METHODS)}")
    check_cost_model(cost_model)
    if offload and cuda_graphs:
        raise ValueError("memplan: offload=True cannot run in CUDA graphs (its copies wait on "
                         "events the host records); leave cuda_graphs off to offload, or offload off")
    if compile:
        warnings.warn("memplan: with compile=True the predicted peak counts the kernels "
                      "inductor fuses, and inductor runs the plan in segments of planned order, "
                      "but within a segment it may hold values longer (on an H200, the "
                      "least-budget plans of GPT-2 medium and DenseNet-BC-100 measured 1.1% and "
                      "1.2% over it, within the 1.5% of a CUDA budget kept as headroom)",
                      stacklevel=2)
    if not isinstance(budget, (int, float, str)):
        parse_budget(budget)  # raises the error that lists the accepted forms
    plan: Plan

    def plan_for(args: tuple, kwargs: dict) -> tuple[CapturedStep, Any]:
        flat = pytree.tree_leaves((args, kwargs))
        device = device_of(model, flat)
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"memplan: cuda_graphs=True needs the model and its inputs on a CUDA "
                             f"device, not {device}; move them there, or leave cuda_graphs off")
        if cuda_graphs:
            check_inputs(flat)
        link = host_link(device) if offload else None
        holder: dict[str, PlanResult] = {}

        def planner(graph: JointGraph, joint: torch.fx.GraphModule) -> Program:
            times = node_times(cost_model, graph, joint, device,
                               executor="compiled" if compile else
                               "cuda_graphs" if cuda_graphs else "eager")
            graphs_bytes = held_bytes(model, flat, graph) if cuda_graphs else 0
            holder["result"] = plan_step(graph, budget, method, device, node_time_s=times,
                                         time_limit_s=time_limit_s,
                                         deterministic_time=deterministic_time,
                                         graphs_bytes=graphs_bytes,
                                         link=link)
            return holder["result"].chosen.program

        step, out_spec = capture(model, args, kwargs, planner, compile=compile)
        if cuda_graphs:
            check_dropout(model, step)
        plan.latest = holder["result"]
        return step, out_spec

    plan = Plan(module=PlannedModule(model, plan_for, cuda_graphs=cuda_graphs), budget=budget,
                requested_method=method)
    if example_inputs is not None or example_kwargs is not None:
        args, kwargs = tuple(example_inputs or ()), dict(example_kwargs or {})
        plan.module.prepare(args, kwargs)
    return plan
