"""Rematerialization over external computation graphs (Checkmate / Moccasin semantics); no torch.

>>> from memplan.remat import load_graph, solve
>>> plan = solve(load_graph("VGG16_256_train.json"), 14 * 2**30)  # doctest: +SKIP
>>> plan.feasible, plan.total_cost, plan.peak_bytes, plan.method  # doctest: +SKIP
"""

from memplan.remat import solver_bruteforce, solver_cpsat, solver_evict, solver_topo  # noqa: F401  (register)
from memplan.remat.api import minimum_bytes, solve
from memplan.remat.graph import Graph, load_graph, make_graph
from memplan.remat.registry import SolverConfig, names as methods
from memplan.remat.schedule import InternalError, Schedule

__all__ = [
    "Graph",
    "InternalError",
    "Schedule",
    "SolverConfig",
    "load_graph",
    "make_graph",
    "methods",
    "minimum_bytes",
    "solve",
]
