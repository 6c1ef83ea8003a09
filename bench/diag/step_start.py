"""What is allocated on the device when a planned step begins that the plan does not account
for: the caching allocator's live blocks at the step's start, less the parameters, buffers and
input, each with the Python frames that allocated it, against the plan's ambient bytes (memory
it measured as not its own) and its simulation at the first node.

    python bench/diag/step_start.py MODEL BUDGET [--compile] [--frames N] [--cpp]

MODEL is one of bench/gpu.py's; BUDGET as ``memplan.optimize`` takes it. Allocations are recorded
from the process's start, so every block's origin is known.
"""

from __future__ import annotations

import argparse
import collections
import linecache
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402
import gpu  # noqa: E402

import memplan  # noqa: E402
from memplan.liveness import simulate  # noqa: E402

MiB = 2**20


def owned_ranges(module: torch.nn.Module, x: torch.Tensor) -> list[tuple[int, int]]:
    tensors = [*module.parameters(), *module.buffers(), x]
    return [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors]


def live_blocks(owned: list[tuple[int, int]]) -> list[dict]:
    """The allocated blocks that hold none of ``owned``."""
    blocks = [b for segment in torch.cuda.memory._snapshot()["segments"]
              for b in segment["blocks"] if b["state"] == "active_allocated"]
    return [b for b in blocks
            if not any(b["address"] <= ptr < b["address"] + b["size"] for ptr, _ in owned)]


def origin(block: dict, frames: int) -> str:
    """The innermost frames outside torch's own Python files (or torch's if there are none), an
    fx graph's with its line of code, then the innermost C++ frames if they were recorded."""
    stack = block.get("frames", [])
    python = [f for f in stack if f["filename"].endswith(".py") or f["filename"].startswith("<")]
    outside = [f for f in python if "/torch/" not in f["filename"]] or python
    where = [f"{Path(f['filename']).name}:{f['line']} {f['name']}"
             + (f" `{linecache.getline(f['filename'], f['line']).strip()}`"
                if f["filename"].startswith("<eval_with_key>") else "")
             for f in outside[:frames]]
    native = [f["name"] for f in stack if f not in python and "lloc" not in f["name"]][:frames]
    return " ← ".join(where) + (f" [{' ← '.join(native)}]" if native else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=gpu.MODELS)
    parser.add_argument("budget")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--cpp", action="store_true", help="record C++ frames too (slower)")
    args = parser.parse_args()
    torch.cuda.memory._record_memory_history(enabled="state", stacks="all" if args.cpp else "python")
    _title, make, _checkpointed, inputs = gpu.MODELS[args.model]
    torch.manual_seed(0)
    model, x = make().cuda(), inputs()
    plan = memplan.optimize(model, args.budget, example_inputs=(x,), compile=args.compile)
    for _ in range(2):
        core.step(plan.module, x)
    for p in model.parameters():
        p.grad = None
    torch.cuda.synchronize()
    result = plan._result()
    timeline = simulate(result.graph, result.chosen.program)
    owned = owned_ranges(model, x)
    owned_bytes = sum(n for _, n in owned)
    blocks = live_blocks(owned)
    print(f"{args.model} {'compiled' if args.compile else 'eager'} at {args.budget}: "
          f"allocated {torch.cuda.memory_allocated() / MiB:.1f} MiB at the step's start; "
          f"parameters, buffers and input {owned_bytes / MiB:.1f} MiB; other blocks "
          f"{sum(b['size'] for b in blocks) / MiB:.1f} MiB in {len(blocks)}; the plan's ambient "
          f"bytes {result.graph.ambient_bytes / MiB:.1f} MiB; simulated at its first node "
          f"({timeline.steps[0]}) {timeline.live_bytes[0] / MiB:.1f} MiB")
    by_origin: dict[str, list[int]] = collections.defaultdict(list)
    for block in blocks:
        by_origin[origin(block, args.frames)].append(block["size"])
    print("| MiB | blocks | allocated at |\n|---|---|---|")
    for where, sizes in sorted(by_origin.items(), key=lambda item: -sum(item[1])):
        print(f"| {sum(sizes) / MiB:.2f} | {len(sizes)} | {where} |")


if __name__ == "__main__":
    main()
