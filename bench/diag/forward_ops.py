"""Where a planned forward's device time goes, beside eager's: kernel time per op, profiled.

    python bench/diag/forward_ops.py [MODEL] [BUDGET]      (defaults: gpt2m_sdpa 6.8GiB)
"""

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu  # noqa: E402

import memplan  # noqa: E402


def device_ms_per_op(module, x, rows: int = 14) -> None:
    for _ in range(2):
        module(x).float().sum().backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        module(x).float().sum()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.key.startswith("aten::")]
    total = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    print(f"  forward device time {total:.1f} ms; by op (self device ms, calls):")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]:
        print(f"    {e.key:<50} {e.self_device_time_total / 1e3:8.2f} {e.count:6d}")


def main(name: str, budget: str) -> None:
    _title, build, _checkpointed, inputs = gpu.MODELS[name]
    torch.manual_seed(0)
    model, x = build().cuda(), inputs()
    print("eager")
    device_ms_per_op(model, x)
    plan = memplan.optimize(model, budget, example_inputs=(x,))
    print(f"memplan {budget} ({plan.method})")
    device_ms_per_op(plan.module, x)
    attention = [n for n in plan._result().graph.nodes if "attention" in n.op]
    print("attention ops in the plan's graph:", sorted({n.op for n in attention}))
    print("their inputs:", [plan._result().graph[i].op for i in attention[0].inputs] if attention else [])


if __name__ == "__main__":
    main(*(sys.argv[1:] or ["gpt2m_sdpa", "6.8GiB"]))
