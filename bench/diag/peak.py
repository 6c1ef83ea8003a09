"""Where the measured GPU peak of a planned step happens, next to where memplan predicted it.

Records the caching allocator's history (with Python frames) over one planned step of a small
pre-activation ResNet (or DenseNet-BC-100), finds the moment of the highest allocated total, and
prints the events just before it with the fx line that made them, beside the simulator's
timeline at its peak.

    python bench/diag/peak.py [BUDGET] [resnet56|densenet100] [METHOD]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import densenet  # noqa: E402
import resnet1001  # noqa: E402

import memplan  # noqa: E402

MiB = 2**20


def frame_of(event: dict) -> str:
    for frame in event.get("frames", []):
        if "eval_with_key" in frame["filename"] or frame["filename"].startswith("<"):
            return f"{frame['filename']}:{frame['line']}"
    return "?"


def main(budget: str, model_name: str, method: str) -> None:
    torch.manual_seed(0)
    model = (densenet.model(100, 12) if model_name == "densenet100" else resnet1001.model(56)).cuda()
    x = torch.randn(64, 3, 32, 32, device="cuda")
    plan = memplan.optimize(model, budget, example_inputs=(x,), method=method)
    if budget == "min":
        plan = memplan.optimize(model, plan.minimum_budget_bytes, example_inputs=(x,), method=method)
    for _ in range(2):
        plan.module(x).sum().backward()
    for p in model.parameters():
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    plan.module(x).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for e in snapshot["device_traces"][0] if e["action"] in ("alloc", "free_completed")]
    total, best, best_i = start, start, 0
    for i, e in enumerate(events):
        total += e["size"] if e["action"] == "alloc" else -e["size"]
        if total > best:
            best, best_i = total, i
    result = plan._result()
    timeline = result.chosen.timeline
    print(f"budget {budget}: measured {peak / MiB:.1f} MiB (replayed {best / MiB:.1f}), predicted "
          f"{plan.predicted_peak_bytes / MiB:.1f} MiB at {timeline.peak_node}")
    for e in events[max(0, best_i - 24): best_i + 1]:
        print(f"   {e['action']:<15} {e['size'] / MiB:8.2f} MiB  {frame_of(e)}")
    step = plan.module._steps[next(iter(plan.module._steps))][0]
    for gm, name in zip(step.fx_compiled, ("forward", "backward")):
        lines = gm.code.splitlines()
        print(f"--- {name} graph: {len(lines)} lines; code around frames above:")
        for e in events[max(0, best_i - 24): best_i + 1]:
            frame = frame_of(e)
            if frame != "?" and ":" in frame:
                line = int(frame.rsplit(":", 1)[1])
                if line <= len(lines):
                    print(f"   {line}: {lines[line - 1].strip()[:150]}")
    p = timeline.peak_step
    for label, live in list(zip(timeline.steps, timeline.live_bytes))[max(0, p - 12): p + 3]:
        print(f"   predicted {label:<50} {live / MiB:8.1f} MiB")


if __name__ == "__main__":
    arguments = sys.argv[1:] + ["50%", "resnet56", "auto"][len(sys.argv) - 1:]
    main(*arguments[:3])
