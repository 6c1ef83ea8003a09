"""What a compiled plan's first step holds at its peak that later steps do not, and which of
inductor's kernels are benchmarked at their first call: the first step compiles the backward
and runs each kernel for the first time, beside the forward's saved values.

    python bench/diag/first_step.py MODEL      # the allocations live at the first step's peak
    python bench/diag/first_step.py densenet40 # the kernels benchmarked, by heuristic

MODEL is one of bench/gpu.py's, planned at its least compiled budget; ``densenet40`` is
DenseNet-40 (k=12, batch 64, 32×32), which compiles in a minute. For MODEL, allocations are
recorded through the first step and replayed to the moment of their largest total, grouped by
the inductor, memplan or autograd frames that made them. For ``densenet40`` each kernel that
benchmarks its configurations is counted by its heuristic and number of configurations.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import core  # noqa: E402
import densenet  # noqa: E402
import gpu  # noqa: E402

import memplan  # noqa: E402

MiB = 2**20


def where(frames: list[dict]) -> str:
    keep = [f for f in frames if any(k in f["filename"] for k in
                                     ("_inductor", "memplan", "triton", "torch/_tensor", "autograd"))]
    return " <- ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}"
                       for f in (keep[:4] or frames[:3]))


def allocations_at_first_peak(module: torch.nn.Module, x: torch.Tensor) -> None:
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=500000)
    torch.cuda.reset_peak_memory_stats()
    core.step(module, x)
    torch.cuda.synchronize()
    first = torch.cuda.max_memory_allocated()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    torch.cuda.reset_peak_memory_stats()
    core.step(module, x)
    print("first step peak MiB", first / MiB, "second", torch.cuda.max_memory_allocated() / MiB)
    live: dict[int, dict] = {}
    total, best, at_best = 0, -1, {}
    for event in (e for trace in snapshot["device_traces"] for e in trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > best:
                best, at_best = total, dict(live)
        elif event["action"] == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    print("traced growth at peak MiB", best / MiB)
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for event in at_best.values():
        group = groups[where(event.get("frames", []))]
        group[0] += event["size"]
        group[1] += 1
    for origin, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:14]:
        print(f"{size / MiB:9.1f} MiB x{count}  {origin}")


def benchmarked_kernels() -> collections.Counter:
    from torch._inductor.runtime import triton_heuristics
    seen: collections.Counter = collections.Counter()
    benchmark = triton_heuristics.CachingAutotuner.benchmark_all_configs

    def counting(self, *args, **kwargs):
        seen[(str(self.heuristic_type), len(self.launchers))] += 1
        return benchmark(self, *args, **kwargs)
    triton_heuristics.CachingAutotuner.benchmark_all_configs = counting
    return seen


def main() -> None:
    name = sys.argv[1]
    seen = benchmarked_kernels() if name == "densenet40" else None
    torch.manual_seed(0)
    if name == "densenet40":
        model, x = densenet.model(40, 12).cuda(), torch.randn(64, 3, 32, 32, device="cuda")
    else:
        _title, make, _checkpointed, inputs = gpu.MODELS[name]
        model, x = make().cuda(), inputs()
    budget = core.least_budget(model, x, compile=True)
    plan = memplan.optimize(model, budget, example_inputs=(x,), compile=True)
    print(name, "budget MiB", budget / MiB, "predicted", plan.predicted_peak_bytes / MiB)
    if seen is None:
        allocations_at_first_peak(plan.module, x)
        return
    torch.cuda.reset_peak_memory_stats()
    core.step(plan.module, x)
    first = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    core.step(plan.module, x)
    print("first step peak MiB", first / MiB, "second", torch.cuda.max_memory_allocated() / MiB)
    for (heuristic, configs), count in seen.most_common():
        print(f"{count} kernels benchmarked: {heuristic}, {configs} configurations")


if __name__ == "__main__":
    main()
