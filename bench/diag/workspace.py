"""Where measured and predicted GPU peaks differ: memory outside the graph's tensors.

Runs one planned step of a small pre-activation ResNet with cuDNN on and off, and reports the
bytes allocated at the step's start, the predicted resident bytes, and both peaks.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import resnet1001  # noqa: E402

import memplan  # noqa: E402

MiB = 2**20


def run(cudnn: bool) -> None:
    torch.backends.cudnn.enabled = cudnn
    torch.manual_seed(0)
    model = resnet1001.model(56).cuda()
    x = torch.randn(64, 3, 32, 32, device="cuda")
    plan = memplan.optimize(model, "50%", example_inputs=(x,))
    for _ in range(2):
        plan.module(x).sum().backward()
    for p in model.parameters():
        p.grad = None
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=100000)
    plan.module(x).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    result = plan._result()
    print(f"cudnn={cudnn}: allocated at start {start / MiB:.1f} MiB, predicted resident "
          f"{result.graph.resident_bytes / MiB:.1f} MiB; peak measured {peak / MiB:.1f} MiB, "
          f"predicted {plan.predicted_peak_bytes / MiB:.1f} MiB, at {result.chosen.timeline.peak_node}")
    sizes = {}
    for trace in snapshot["device_traces"]:
        for event in trace:
            if event["action"] == "alloc" and event["size"] >= 8 * MiB:
                frames = [f"{f['filename'].split('/')[-1]}:{f['name']}" for f in event["frames"][:6]]
                sizes.setdefault((event["size"] // MiB, tuple(frames)), 0)
                sizes[(event["size"] // MiB, tuple(frames))] += 1
    for (size, frames), count in sorted(sizes.items(), reverse=True)[:8]:
        print(f"   {size} MiB x{count}: {' < '.join(frames)}")


if __name__ == "__main__":
    run(True)
    run(False)
