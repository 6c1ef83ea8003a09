"""How long a compiled segment may be: the compiled step's peak against its prediction, on the
CPU, for several segment lengths (``memplan.inductor.OPS_PER_SEGMENT``).

    python bench/diag/segment_length.py [OPS ...]

The model is DenseNet-like without convolutions (each layer reads the concatenation of all
earlier features, so backward accumulates gradients from slices, the pattern inductor moved on
DenseNet; a CPU convolution's scratch would blur the count), planned at its least budget. The
peak is the CPU allocator's own count from the profiler's memory events, over the step, plus
parameters and input. It includes kernels' scratch that no prediction has, so the eager
executor's row is the reference: the same count for the eager plan.
"""

import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402

import memplan  # noqa: E402
import memplan.inductor  # noqa: E402


class DenseMLP(nn.Module):
    def __init__(self, layers: int = 12, growth: int = 64, width: int = 64):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.BatchNorm1d(width + i * growth), nn.ReLU(),
                          nn.Linear(width + i * growth, growth)) for i in range(layers))
        self.head = nn.Linear(width + layers * growth, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for block in self.blocks:
            features.append(block(torch.cat(features, 1)))
        return self.head(torch.cat(features, 1))


def allocator_peak(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes the CPU allocator held at the step's peak above its start."""
    for p in module.parameters():
        p.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        module(x).sum().backward()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def main() -> None:
    lengths = [int(a) for a in sys.argv[1:]] or [10**6, 50, 10]
    torch.manual_seed(0)
    model, x = DenseMLP(), torch.randn(1024, 64)
    resident = sum(p.numel() * p.element_size() for p in model.parameters()) + x.numel() * 4
    rows = [(False, 0)] + [(True, n) for n in lengths]
    for compile, length in rows:
        memplan.inductor.OPS_PER_SEGMENT = length or memplan.inductor.OPS_PER_SEGMENT
        torch._dynamo.reset()
        budget = core.least_budget(model, x, compile)
        start = time.perf_counter()
        plan = memplan.optimize(model, budget, example_inputs=(x,), compile=compile)
        plan.module(x).sum().backward()
        seconds = time.perf_counter() - start
        peak = allocator_peak(plan.module, x) + resident
        label = f"compiled, {length} ops per segment" if compile else "eager executor"
        print(f"{label}: least budget {budget:,} B, allocator peak {peak:,} B "
              f"({peak / plan.predicted_peak_bytes - 1:+.1%} of predicted), plan+compile "
              f"{seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
