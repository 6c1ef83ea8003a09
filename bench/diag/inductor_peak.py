"""Inductor's own memory estimate of memplan's compiled backward, and the buffers live at its
peak, on the CPU: where the compiled step departs from the planned order.

    python bench/diag/inductor_peak.py [BUDGET_BYTES]

Without a budget, the least one memplan names for DenseNet-40 (k=12, batch 32×3×32×32).
Inductor estimates each graph's peak (``torch._inductor.memory``) before it reorders for
memory; this prints that estimate for the backward, the scheduler node at the peak, the
largest buffers live there, and the nodes that read them. Inductor is given whole graphs here
(one segment each), the departure that segmented compilation (``memplan.inductor``) bounds.
"""

import sys
from pathlib import Path

import torch
import torch._inductor.memory as inductor_memory

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import core  # noqa: E402
import densenet  # noqa: E402

import memplan  # noqa: E402
import memplan.inductor  # noqa: E402

timelines = []
_compute_memory_timeline = inductor_memory.compute_memory_timeline


def recording(nodes, freeable_inputs, graph_outputs):
    result = _compute_memory_timeline(nodes, freeable_inputs, graph_outputs)
    timelines.append((nodes, result[0]))
    return result


def origins(scheduler_node) -> list[str]:
    node = getattr(scheduler_node, "node", None)
    return sorted(o.name for o in getattr(node, "origins", ()))[:4] or [scheduler_node.get_name()]


def main() -> None:
    torch._inductor.config.force_disable_caches = True  # the estimate runs only when compiling
    memplan.inductor.OPS_PER_SEGMENT = 10**9  # one segment per graph: one timeline each
    inductor_memory.compute_memory_timeline = recording
    torch.manual_seed(0)
    model, x = densenet.model(40, 12), torch.randn(32, 3, 32, 32)
    budget = int(sys.argv[1]) if len(sys.argv) > 1 else None
    if budget is None:
        budget = core.least_budget(model, x, compile=True)
    plan = memplan.optimize(model, budget, example_inputs=(x,), compile=True)
    forward_timelines = len(timelines)
    plan.module(x).sum().backward()  # the backward compiles at its first call
    nodes, buffers = timelines[forward_timelines]
    delta = [0] * (len(nodes) + 1)
    for b in buffers:
        delta[b.start_step] += b.size_alloc
        if b.end_step >= 0:
            delta[b.end_step + 1] -= b.size_free
    live_bytes, peak, peak_step = 0, 0, 0
    for step in range(len(nodes)):
        live_bytes += delta[step]
        if live_bytes > peak:
            peak, peak_step = live_bytes, step
    print(f"memplan: budget {budget:,} B, predicted step peak {plan.predicted_peak_bytes:,} B")
    print(f"inductor's estimate of the backward: {peak:,} B at step {peak_step} of {len(nodes)} "
          f"({nodes[peak_step].get_name()}: {origins(nodes[peak_step])})")
    step_of = {node: step for step, node in enumerate(nodes)}
    live = sorted((b for b in buffers if b.start_step <= peak_step and
                   (b.end_step >= peak_step or b.end_step == -1)), key=lambda b: -b.size_alloc)
    for b in live[:8]:
        readers = sorted((step_of[u.node], origins(u.node)) for u in getattr(b.buffer, "users", ())
                         if getattr(u, "node", None) in step_of)
        made_by = origins(b.buffer.defining_op) if hasattr(b.buffer, "defining_op") else ["input"]
        print(f"  {b.size_alloc:>12,} B {b.buffer.get_name():<14} steps {b.start_step}–{b.end_step}"
              f" made by {made_by}, read at {[s for s, _ in readers]}")


if __name__ == "__main__":
    main()
