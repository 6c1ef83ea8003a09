"""Where the compiled path's peak comes from: forward and backward peaks of one planned step,
eager executor against inductor, for the same plan budget.

    python bench/diag/compiled_peak.py [BUDGET_BYTES]

Without a budget, the least one memplan names for DenseNet-BC-100 (k=12, batch 64×3×32×32).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import core  # noqa: E402
import densenet  # noqa: E402

import memplan  # noqa: E402

MiB = 2**20


def phase_peaks(module, x) -> tuple[int, int, int]:
    """Bytes above the step's start: forward peak, live after forward, backward peak."""
    for _ in range(2):
        module(x).sum().backward()
    for p in module.parameters():
        p.grad = None
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = module(x).sum()
    torch.cuda.synchronize()
    forward, after = torch.cuda.max_memory_allocated() - start, torch.cuda.memory_allocated() - start
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    return forward, after, torch.cuda.max_memory_allocated() - start


def main() -> None:
    torch.manual_seed(0)
    model = densenet.model(100, 12).cuda()
    x = torch.randn(64, 3, 32, 32, device="cuda")
    budget = int(sys.argv[1]) if len(sys.argv) > 1 else None
    if budget is None:
        budget = core.least_budget(model, x)
    for compile in (False, True):
        plan = memplan.optimize(model, budget, example_inputs=(x,), compile=compile)
        forward, after, backward = phase_peaks(plan.module, x)
        timeline = plan._result().chosen.timeline
        print(f"{'compiled' if compile else 'eager'} ({plan.method}, budget {budget / MiB:.1f} MiB):"
              f" forward peak +{forward / MiB:.1f} MiB, live after forward +{after / MiB:.1f} MiB,"
              f" backward peak +{backward / MiB:.1f} MiB; predicted step peak"
              f" {timeline.peak_bytes / MiB:.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
