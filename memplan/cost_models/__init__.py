"""Time estimates per node: what a recomputation costs.

``analytic``: a roofline per device, no device time. ``profile``: each distinct op timed on the
device, cached on disk; ops it cannot run on made-up values keep their analytic estimate.
"""

from __future__ import annotations

import torch

from memplan.cost_models.analytic import DEVICES, AnalyticCostModel, for_device
from memplan.cost_models.profile import OpTimeCache, default_cache_path, profile_times
from memplan.graph import JointGraph

COST_MODELS = ("analytic", "profile")

__all__ = ["COST_MODELS", "DEVICES", "AnalyticCostModel", "OpTimeCache", "check_cost_model",
           "for_device", "node_times"]


def check_cost_model(name: str) -> None:
    if name not in COST_MODELS:
        raise ValueError(f"unknown cost model {name!r}: choose one of {list(COST_MODELS)}")


def node_times(name: str, graph: JointGraph, joint: torch.fx.GraphModule,
               device: torch.device, *, executor: str = "eager") -> dict[str, float]:
    """Seconds per node of ``graph`` under the named cost model, for the executor that runs
    the plan (``for_device``)."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    model = for_device(device.type, device_name, executor=executor)
    times = model.times(graph)
    if name == "profile":  # ops timed alone; pointwise ones keep their fused price where fused
        measured = profile_times(joint, device, OpTimeCache(default_cache_path()))
        times.update((node, seconds) for node, seconds in measured.items()
                     if not (model.fuses_pointwise and graph[node].pointwise))
    return times
