"""GPU benchmark of the core pipeline: naive eager, built-in checkpointing, memplan at 50%, at the
built-in checkpointing's measured peak and at the minimum feasible budget, on DenseNet-BC-100
(k=12, 64×3×32×32), ResNet-1001 (64×3×32×32) and GPT-2 medium (8×1024 tokens; its built-in
checkpointing is Hugging Face's ``gradient_checkpointing_enable``).

Every row is one training step (forward, loss, backward) measured in the same process on the
same inputs: peak = ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` with
the model and inputs already on the device; time = median of 5 steps after 2 warm-ups.

    python bench/core.py --out bench/results/core_<device>.md
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint_sequential

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import densenet  # noqa: E402
import resnet1001  # noqa: E402

import memplan  # noqa: E402

GiB = 2**30


def step(module: torch.nn.Module, x: torch.Tensor) -> None:
    for p in module.parameters():
        p.grad = None
    out = module(x)  # held through backward, as `out = model(x); loss_fn(out, y).backward()` does
    out.float().sum().backward()


def least_budget(model: torch.nn.Module, x: torch.Tensor, compile: bool = False,
                 cuda_graphs: bool = False) -> int:
    """The least budget memplan names for this step: the one its refusal of 1 byte gives."""
    try:
        memplan.optimize(model, 1, example_inputs=(x,), compile=compile, cuda_graphs=cuda_graphs)
    except memplan.InfeasibleBudgetError as error:
        return error.minimum_bytes
    raise AssertionError("a 1-byte budget was accepted")


def timed_step_ms(module: torch.nn.Module, x: torch.Tensor) -> float:
    """Wall-clock ms of one step, the device synchronised at both ends."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    step(module, x)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def measure(module: torch.nn.Module, x: torch.Tensor, repeats: int = 5) -> tuple[int, float]:
    """Peak bytes of one step and its median time in ms."""
    for _ in range(2):
        step(module, x)
    torch.cuda.synchronize()
    for p in module.parameters():
        p.grad = None
    torch.cuda.reset_peak_memory_stats()
    measure.start_bytes = torch.cuda.memory_allocated()
    step(module, x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    times = []
    mallocs = torch.cuda.memory_stats().get("num_device_alloc", 0)
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(module, x)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    # cudaMalloc calls in the timed steps: each synchronizes, so a step that needs any (the
    # cache fragmented, blocks freed to fit) is slower for reasons no op's time shows
    measure.device_allocs = torch.cuda.memory_stats().get("num_device_alloc", 0) - mallocs
    return peak, statistics.median(times)


class SequentialCheckpoint(torch.nn.Module):
    """Chen's sqrt(n) baseline with PyTorch's own checkpoint_sequential over the residual blocks."""

    def __init__(self, model: resnet1001.PreActResNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        blocks = m.layers
        out = checkpoint_sequential(blocks, round(math.sqrt(len(blocks))), m.conv(x),
                                    use_reentrant=False)
        out = torch.nn.functional.relu(m.norm(out))
        return m.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(out, 1), 1))


class Logits(torch.nn.Module):
    """A Hugging Face causal LM as a module from token ids to logits."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids, return_dict=False)[0]


def gpt2_medium(attention: str = "eager") -> Logits:
    """``attention="sdpa"`` is Hugging Face's default: on CUDA in fp32, the memory-efficient
    kernel, which keeps no attention matrix."""
    import transformers

    config = transformers.GPT2Config(n_layer=24, n_embd=1024, n_head=16, use_cache=False)
    config._attn_implementation = attention
    return Logits(transformers.GPT2LMHeadModel(config))


def _hf_checkpointing(model: Logits) -> Logits:
    """Hugging Face's own per-layer checkpointing."""
    model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def planned_rows(name: str, model: torch.nn.Module, x: torch.Tensor, builtin_peak: int,
                 cost_model: str, method: str) -> list[dict]:
    """memplan at 50% of the unplanned peak, at the built-in checkpointing's measured peak, and (for
    ``auto``, which tries every fast solver) at the smallest budget any schedule reaches."""
    rows = []
    minimum = None
    labels = ["memplan 50%", "memplan at built-in's peak"] + (["memplan minimum"] if method == "auto" else [])
    for label in labels:
        budget = {"memplan 50%": "50%", "memplan at built-in's peak": builtin_peak}.get(label, minimum)
        start = time.perf_counter()
        try:
            plan = memplan.optimize(model, budget, example_inputs=(x,), cost_model=cost_model,
                                    method=method)
        except memplan.InfeasibleBudgetError as error:
            print(label, "infeasible:", error, flush=True)
            continue
        plan_s = time.perf_counter() - start
        minimum = plan.minimum_budget_bytes
        peak, ms = measure(plan.module, x)
        result = plan._result()
        print(label, "allocated at step start", measure.start_bytes, "predicted resident",
              result.graph.resident_bytes, "other", result.graph.ambient_bytes,
              "peak breakdown", result.chosen.timeline.peak_breakdown, "at",
              result.chosen.timeline.peak_node, flush=True)
        rows.append(dict(model=name, config=f"{label} ({plan.method}, {cost_model})", peak=peak, ms=ms,
                         predicted=plan.predicted_peak_bytes, budget=plan.budget_bytes,
                         overhead=plan.predicted_overhead, plan_s=plan_s))
    return rows


def run_model(name: str, build, checkpointed, x: torch.Tensor, cost_model: str,
              methods: list[str]) -> list[dict]:
    torch.manual_seed(0)
    model = build().cuda()
    rows = []
    peak, ms = measure(model, x)
    rows.append(dict(model=name, config="naive eager", peak=peak, ms=ms))
    baseline = checkpointed(copy.deepcopy(model))
    builtin_peak, builtin_ms = measure(baseline, x)
    rows.append(dict(model=name, config="built-in checkpointing", peak=builtin_peak, ms=builtin_ms))
    del baseline
    for method in methods:
        for row in planned_rows(name, model, x, builtin_peak, cost_model, method):
            row["measured_overhead"] = row["ms"] / ms - 1
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | configuration | measured peak GiB | predicted peak GiB | error | budget GiB "
             "| step ms | overhead vs naive: measured | predicted | plan s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        predicted = r.get("predicted")
        lines.append("| {} | {} | {:.3f} | {} | {} | {} | {:.1f} | {} | {} | {} |".format(
            r["model"], r["config"], r["peak"] / GiB,
            f"{predicted / GiB:.3f}" if predicted else "–",
            f"{r['peak'] / predicted - 1:+.2%}" if predicted else "–",
            f"{r['budget'] / GiB:.3f}" if "budget" in r else "–", r["ms"],
            f"{r['measured_overhead']:+.1%}" if "measured_overhead" in r else "–",
            f"+{r['overhead']:.1%}" if "overhead" in r else "–",
            f"{r['plan_s']:.1f}" if "plan_s" in r else "–"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--models", default="densenet,resnet1001")
    parser.add_argument("--resnet-depth", type=int, default=1001)
    parser.add_argument("--cost-model", default="analytic", choices=["analytic", "profile"])
    parser.add_argument("--methods", default="auto", help="comma-separated planning methods")
    args = parser.parse_args()
    methods = args.methods.split(",")
    x = torch.randn(64, 3, 32, 32, device="cuda")
    rows = []
    if "densenet" in args.models:
        rows += run_model("DenseNet-BC-100 k=12", lambda: densenet.model(100, 12), _efficient, x,
                          args.cost_model, methods)
    if "resnet1001" in args.models:
        rows += run_model(f"ResNet-{args.resnet_depth} pre-act",
                          lambda: resnet1001.model(args.resnet_depth), SequentialCheckpoint, x,
                          args.cost_model, methods)
    if "gpt2m" in args.models:
        ids = torch.randint(0, 50257, (8, 1024), device="cuda")
        rows += run_model("GPT-2 medium", gpt2_medium, _hf_checkpointing, ids, args.cost_model,
                          methods)
    header = (f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, fp32; CNNs: "
              "batch 64×3×32×32; GPT-2 medium (HF, eager attention, dropout 0.1): 8×1024 tokens\n"
              f"command: python bench/core.py {' '.join(sys.argv[1:])}\n")
    text = header + "\n" + table(rows) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


def _efficient(model: densenet.DenseNet) -> densenet.DenseNet:
    """The memory-efficient DenseNet baseline: the same model with per-layer checkpointing."""
    for module in model.modules():
        if hasattr(module, "efficient"):
            module.efficient = True
    return model


if __name__ == "__main__":
    main()
