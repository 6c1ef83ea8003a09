"""Time estimates per node: what a recomputation costs."""

from memplan.cost_models.analytic import DEVICES, AnalyticCostModel

__all__ = ["AnalyticCostModel", "DEVICES"]
