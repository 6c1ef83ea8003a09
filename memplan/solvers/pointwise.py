"""``pointwise``: recompute the large values of pointwise ops, keep everything else.

The idea of torch.compile's default partitioner: compiled, a recomputed chain of pointwise ops
(a BatchNorm's normalisation and its ReLU) fuses into the backward kernel that reads it, and
costs about one more read of what the chain reads. Small pointwise values (per-channel or
per-token statistics, under ``SMALL_FRACTION`` of the largest forward value) are kept:
recomputing them saves nothing, and saving a BatchNorm's variance instead of its inverse
standard deviation made inductor write a kernel Triton rejects (torch 2.11, H200).
"""

from memplan.graph import JointGraph
from memplan.program import build_program, candidates
from memplan.solvers.base import SolverConfig, StepSchedule, evaluate

SMALL_FRACTION = 1 / 64


def solve(graph: JointGraph, budget_bytes: int, *, config: SolverConfig) -> StepSchedule:
    values = candidates(graph)
    nbytes = {n.name: sum(graph.storages[s].nbytes for s in graph.allocates[n.name]) for n in values}
    small = max(nbytes.values(), default=0) * SMALL_FRACTION
    keep = (n.name for n in values if not n.pointwise or nbytes[n.name] < small)
    return evaluate(graph, build_program(graph, keep), budget_bytes, method="pointwise", config=config)
