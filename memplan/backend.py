"""The compiler-pass path: ``torch.compile(model, backend=memplan.backend(budget="8GB"))``.

The budget bounds one graph, so the step must be one graph: a graph break is refused with an
error that names it (``fullgraph=True`` semantics), since graphs planned one by one against the
whole budget could together exceed it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.fx as fx

from memplan.api import METHODS, PlanResult, host_link, plan_step
from memplan.capture import device_of, make_partition
from memplan.cost_models import check_cost_model, node_times
from memplan.errors import CaptureError
from memplan.inductor import compile_with_inductor
from memplan.passes.offload import fetch_in_backward, offload_in_forward


def backend(budget: Any, *, method: str = "auto", cost_model: str = "analytic",
            offload: bool = False, time_limit_s: float = 30.0,
            deterministic_time: float | None = None) -> Callable[..., Any]:
    """A torch.compile backend that plans the step under ``budget`` and compiles it with inductor.

    The plans it made are in the backend's ``plans`` list, newest last. Their predicted peaks
    count the kernels inductor fuses (``memplan.liveness``): inductor keeps the planned order
    between segments of the graphs (``memplan.inductor``) but can exceed the budget within one.
    ``offload``, ``time_limit_s`` and ``deterministic_time`` are ``memplan.optimize``'s.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {list(METHODS)}")
    check_cost_model(cost_model)
    plans: list[PlanResult] = []

    def memplan_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        _refuse_graph_break(gm)
        device = device_of(gm, example_inputs)
        link = host_link(device) if offload else None
        result: dict[str, Any] = {}  # this graph's plan: its backward compiles at its first call

        def planner(graph, joint):
            times = node_times(cost_model, graph, joint, device, executor="compiled")
            plans.append(plan_step(graph, budget, method, device, node_time_s=times,
                                   time_limit_s=time_limit_s,
                                   deterministic_time=deterministic_time, link=link))
            return plans[-1].chosen.program

        outputs = next(iter(reversed(gm.graph.nodes))).args[0]
        partition = make_partition(planner, result, device=device, user_outputs=len(outputs),
                                   param_count=0, buffer_count=0, eager=False)
        return compile_with_inductor(
            gm, example_inputs, partition,
            rewrite_forward=lambda g: offload_in_forward(g, result["program"]),
            rewrite_backward=lambda g: fetch_in_backward(g, result["program"]))

    memplan_backend.plans = plans
    return memplan_backend


def _refuse_graph_break(gm: fx.GraphModule) -> None:
    """Dynamo marks a graph that ends at a graph break with the break's reason and location."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not reason.graph_break:
        return
    where = "".join(f"\n  {frame.filename}:{frame.lineno} in {frame.name}" for frame in reason.user_stack)
    raise CaptureError(
        f"memplan.backend: the step has a graph break ({reason.reason}){where or ' (no location)'}\n"
        "memplan's budget bounds one graph, and graphs planned one by one could exceed it "
        "together. Remove the break (torch._dynamo.explain(model)(*inputs) lists them), or use "
        "memplan.optimize, which captures the step with torch.export.")
