"""What sets a model's least budget on the GPU: the measured workspaces at the least plan's peak.

Plans the model at its least budget, prints the peak's breakdown and the ops with the largest
measured workspaces (their arguments' shapes and strides), then re-measures the largest call
with its tensor arguments made contiguous, made channels-last, and with cuDNN's TF32 off.

    python bench/diag/conv_workspace.py vgg19 [--channels-last] [--compile [--cuda-graphs]]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402
import gpu  # noqa: E402

import memplan  # noqa: E402
import memplan.capture  # noqa: E402
from memplan.cost_models.workspace import call_workspace, real_argument  # noqa: E402

MiB = 2**20


def described(value) -> str:
    if isinstance(value, fx.Node):
        val = value.meta.get("val")
        if isinstance(val, torch.Tensor):
            return f"{tuple(val.shape)}@{tuple(val.stride())}"
    return repr(value)


def remeasure(node: fx.Node, layout) -> int:
    """The workspace of ``node``'s call with its 4-d tensor arguments in ``layout``."""
    def argument(n: fx.Node):
        value = real_argument(n.meta.get("val"), torch.device("cuda"))
        if layout is not None and isinstance(value, torch.Tensor) and value.dim() == 4:
            value = value.contiguous(memory_format=layout)
        return value
    args, kwargs = pytree.tree_map_only(fx.Node, argument, (node.args, node.kwargs))
    return call_workspace(node.target, args, kwargs, torch.device("cuda"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--top", type=int, default=6)
    args = parser.parse_args()
    _title, build, _checkpointed, inputs = gpu.MODELS[args.model]
    torch.manual_seed(0)
    model, x = build().cuda(), inputs()
    if args.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    seen = {}
    measure = memplan.capture.measure_workspaces

    def recording(joint, device, **options):
        seen["joint"], seen["workspaces"] = joint, measure(joint, device, **options)
        return seen["workspaces"]

    memplan.capture.measure_workspaces = recording
    try:
        least = core.least_budget(model, x, compile=args.compile, cuda_graphs=args.cuda_graphs)
        plan = memplan.optimize(model, least, example_inputs=(x,), compile=args.compile,
                                cuda_graphs=args.cuda_graphs)
    finally:
        memplan.capture.measure_workspaces = measure
    chosen = plan._result().chosen
    print(f"{args.model} channels_last={args.channels_last} compile={args.compile}: least budget {least / MiB:.0f} MiB, "
          f"{plan.method} peaks {chosen.peak_bytes / MiB:.0f} MiB at {chosen.timeline.peak_node}")
    print("  breakdown:", {k: round(v / MiB) for k, v in chosen.timeline.peak_breakdown.items()})
    nodes = {n.name: n for n in seen["joint"].graph.nodes}
    largest = sorted(seen["workspaces"].items(), key=lambda kv: -kv[1])[:args.top]
    for name, nbytes in largest:
        node = nodes[name]
        print(f"  {name}: {nbytes / MiB:.0f} MiB  {node.target}"
              f"({', '.join(described(a) for a in node.args)})")
    top = nodes[largest[0][0]]
    for label, layout in (("as traced", None), ("contiguous", torch.contiguous_format),
                          ("channels-last", torch.channels_last)):
        for tf32 in (True, False):
            torch.backends.cudnn.allow_tf32 = tf32
            print(f"  {top.name} {label}, cuDNN TF32 {tf32}: {remeasure(top, layout) / MiB:.0f} MiB")
    torch.backends.cudnn.allow_tf32 = True


if __name__ == "__main__":
    main()
