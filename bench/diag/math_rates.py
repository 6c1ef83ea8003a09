"""Achieved FLOP rates of matrix products and convolutions, from each op of a step timed on the
device (the ``profile`` cost model), by op family and math mode: what the analytic model's rate
table should say.

For each model, every FLOP-counted node of the joint graph is timed (wall-clock per call of
back-to-back calls, as ``profile`` does), and its family's rate is the family's FLOPs over its
time. Also timed: one large matrix product per math mode, the ceiling of each rate.

    python bench/diag/math_rates.py [--models resnet50 vgg19 ...] [--out FILE]

A model's label may add modes after a colon, joined by ``+``: ``cl`` (model and input
channels-last), ``tf32`` (matmul TF32 on), ``conv-fp32`` (cuDNN TF32 off), e.g. ``resnet50:cl+conv-fp32``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu  # noqa: E402

import memplan  # noqa: E402
import memplan.api  # noqa: E402
from memplan.cost_models import for_device  # noqa: E402
from memplan.cost_models.analytic import CONVOLUTIONS  # noqa: E402

MATH_MODES = (("fp32", torch.float32, False), ("tf32", torch.float32, True),
              ("bf16", torch.bfloat16, False), ("fp16", torch.float16, False))
PRODUCTS = ("aten.mm.", "aten.addmm.", "aten.bmm.", "aten.baddbmm.")


def family(op: str) -> str:
    return ("convolution" if op.startswith(CONVOLUTIONS) else
            "matrix product" if op.startswith(PRODUCTS) else "other")


def big_product_rate(dtype: torch.dtype, tf32: bool) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    return 20 * 2 * 8192**3 / (time.perf_counter() - start)


def timed_graph(name: str, channels_last: bool):
    """The step's graph, and each node's analytic and profiled seconds."""
    _title, build, _checkpointed, inputs = gpu.MODELS[name]
    torch.manual_seed(0)
    model, x = build().cuda(), inputs()
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    seen = {}
    real_node_times = memplan.api.node_times

    def recording(cost_model, graph, joint, device, *, executor="eager"):
        seen["graph"] = graph
        seen["profile"] = real_node_times("profile", graph, joint, device, executor=executor)
        return seen["profile"]

    memplan.api.node_times = recording
    try:
        memplan.optimize(model, "1000GB", example_inputs=(x,), method="none")
    finally:
        memplan.api.node_times = real_node_times
    return seen["graph"], seen["profile"]


def rows_for(label: str, graph, measured: dict[str, float]) -> list[str]:
    analytic = for_device("cuda", torch.cuda.get_device_name()).times(graph)
    flops, seconds, predicted = defaultdict(int), defaultdict(float), defaultdict(float)
    for node in graph.nodes:
        if node.flops and node.name in measured:
            kind = family(node.op)
            flops[kind] += node.flops
            seconds[kind] += measured[node.name]
            predicted[kind] += analytic[node.name]
    step_measured = sum(measured.values())
    step_predicted = sum(analytic[n] for n in measured)
    lines = [f"| {label} | {kind} | {flops[kind] / 1e12:.3f} | {1e3 * seconds[kind]:.2f} | "
             f"{flops[kind] / seconds[kind] / 1e12:.1f} | {1e3 * predicted[kind]:.2f} | "
             f"{1e3 * step_measured:.2f} | {1e3 * step_predicted:.2f} |" for kind in sorted(flops)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["resnet50", "resnet50:cl", "vgg19",
                                                        "densenet264", "gpt2m_sdpa", "gpt2m_sdpa:tf32"])
    parser.add_argument("--out")
    parser.add_argument("--no-products", action="store_true", help="leave out the 8192³ products")
    args = parser.parse_args()
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; cuDNN TF32 "
             f"{torch.backends.cudnn.allow_tf32}, matmul TF32 {torch.backends.cuda.matmul.allow_tf32} "
             f"unless the label says tf32", ""]
    if not args.no_products:
        lines += ["| 8192³ matrix product | TFLOP/s |", "|---|---|"]
        lines += [f"| {label} | {big_product_rate(dtype, tf32) / 1e12:.1f} |"
                  for label, dtype, tf32 in MATH_MODES]
    lines += ["", "| model | family | TFLOP | measured ms | achieved TFLOP/s | analytic ms | "
                  "step ops measured ms | step ops analytic ms |", "|---|---|---|---|---|---|---|---|"]
    for spec in args.models:
        name, _, mode = spec.partition(":")
        modes = set(mode.split("+"))
        torch.backends.cuda.matmul.allow_tf32 = "tf32" in modes
        torch.backends.cudnn.allow_tf32 = "conv-fp32" not in modes
        graph, measured = timed_graph(name, channels_last="cl" in modes)
        lines += rows_for(spec, graph, measured)
        print("\n".join(lines), flush=True)
        if args.out:  # after each model: a run cut short keeps what it measured
            Path(args.out).write_text("\n".join(lines) + "\n")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True


if __name__ == "__main__":
    main()
