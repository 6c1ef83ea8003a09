"""``pointwise``: recompute the large values of pointwise ops, keep everything else; where that
does not fit, recompute also the other values that cost least per byte.

The idea of torch.compile's default partitioner: compiled, a recomputed chain of pointwise ops
(a BatchNorm's normalisation and its ReLU) fuses into the backward kernel that reads it, and
costs about one more read of what the chain reads. Small pointwise values (per-channel or
per-token statistics, under ``SMALL_FRACTION`` of the largest forward value) are kept:
recomputing them saves nothing, and saving a BatchNorm's variance instead of its inverse
standard deviation made inductor write a kernel Triton rejects (torch 2.11, H200).

Under a lower budget, torch.compile's ``activation_memory_budget`` recomputes more, choosing by
time per byte: on ResNet-50 at 0.5, the stem's convolution and the max-pool's indices as well.
Here the other values, ordered by their own time per byte, are recomputed in prefixes of a
geometric grid of lengths, and the cheapest program that fits wins (on ties, the shorter
prefix). Where none fits, the answer is the pointwise values' own plan, over budget.
"""

from memplan.graph import JointGraph
from memplan.program import candidates, must_save
from memplan.solvers.base import (SolverConfig, StepSchedule, evaluate, evaluate_all,
                                  in_cost_order, single_level, that_may_fit)

SMALL_FRACTION = 1 / 64


def solve(graph: JointGraph, budget_bytes: int, *, config: SolverConfig) -> StepSchedule:
    values = candidates(graph)
    nbytes = {n.name: sum(graph.storages[s].nbytes for s in graph.allocates[n.name]) for n in values}
    small = max(nbytes.values(), default=0) * SMALL_FRACTION
    keep = [n.name for n in values if not n.pointwise or nbytes[n.name] < small]
    times = config.node_time_s
    cheapest_per_byte = sorted((n.name for n in values if not n.pointwise and nbytes[n.name]
                                and not must_save(graph, n)),
                               key=lambda name: times.get(name, 0.0) / nbytes[name])
    prefixes = single_level(graph, (set(keep).difference(cheapest_per_byte[:length])
                                    for length in prefix_lengths(len(cheapest_per_byte),
                                                                 config.grid_points)), times)
    # cheapest first; on ties, the shorter prefix
    programs = in_cost_order(graph, that_may_fit(graph, prefixes, budget_bytes), times)
    fitting = evaluate_all(graph, programs, budget_bytes, method="pointwise", config=config,
                           first_fit=True)
    if fitting:
        return fitting[0]
    # Over budget: its own plan's schedule (the first program), as without the search. The least
    # peak of all would need each program simulated far (on ResNet-1001, 30 s at 12% of its
    # peak, against 8 s); over budget, a schedule serves only to name the least budget, which
    # the recursive solvers usually name lower.
    return evaluate(graph, prefixes[0].build(), budget_bytes, method="pointwise", config=config)


def prefix_lengths(count: int, points: int) -> list[int]:
    """0 (pointwise values alone), then lengths up to ``count`` spaced geometrically."""
    if count == 0 or points <= 1:
        return [0]
    return sorted({0, *(round(count ** (i / (points - 1))) for i in range(points))})
