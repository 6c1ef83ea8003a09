"""memplan: fit a PyTorch training step into a memory budget.

>>> plan = memplan.optimize(model, budget="60%", example_inputs=(x,))   # doctest: +SKIP
>>> loss_fn(plan.module(x), y).backward()                               # doctest: +SKIP
>>> print(plan.report())                                                # doctest: +SKIP
"""

from memplan.api import Plan, optimize
from memplan.backend import backend
from memplan.budget import parse_budget
from memplan.errors import (BudgetError, CaptureError, InfeasibleBudgetError, InternalError,
                            MemplanError, WorkerError)
from memplan.remat import Graph, Schedule, load_graph, solve

__all__ = ["backend", "BudgetError", "CaptureError", "Graph", "InfeasibleBudgetError", "InternalError",
           "MemplanError", "Plan", "Schedule", "WorkerError", "load_graph", "optimize", "parse_budget",
           "solve"]
