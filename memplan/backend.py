"""The compiler-pass path: ``torch.compile(model, backend=memplan.backend(budget="8GB"))``.

Each graph dynamo captures is planned on its own against the whole budget; use
``torch.compile(..., fullgraph=True)`` so that the step is one graph and the budget bounds it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.fx as fx

from memplan.api import METHODS, PlanResult, plan_step
from memplan.capture import device_of, make_partition
from memplan.cost_models import check_cost_model, node_times
from memplan.inductor import compile_with_inductor


def backend(budget: Any, *, method: str = "auto", cost_model: str = "analytic",
            time_limit_s: float = 30.0) -> Callable[..., Any]:
    """A torch.compile backend that plans the step under ``budget`` and compiles it with inductor.

    The plans it made are in the backend's ``plans`` list, newest last. Their predicted peaks
    are the eager executor's: inductor's memory is not simulated yet and can exceed the budget.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {list(METHODS)}")
    check_cost_model(cost_model)
    plans: list[PlanResult] = []

    def memplan_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        device = device_of(gm, example_inputs)

        def planner(graph, joint):
            times = node_times(cost_model, graph, joint, device)
            plans.append(plan_step(graph, budget, method, device, node_time_s=times,
                                   time_limit_s=time_limit_s))
            return plans[-1].chosen.program

        outputs = next(iter(reversed(gm.graph.nodes))).args[0]
        partition = make_partition(planner, {}, device=device, user_outputs=len(outputs),
                                   param_count=0, buffer_count=0, eager=False)
        return compile_with_inductor(gm, example_inputs, partition)

    memplan_backend.plans = plans
    return memplan_backend
