"""GPU benchmark, one model per process: memplan against today's tools on the same inputs.

Rows: naive eager; the model's built-in checkpointing (DenseNet ``memory_efficient``, Hugging
Face ``gradient_checkpointing_enable``, ``checkpoint_sequential`` with √n segments elsewhere);
with ``--compile``, torch.compile at ``activation_memory_budget`` 1.0, 0.5 and 0.2 and memplan
compiled; memplan eager at 75%, 50% and 30% of the naive peak and at the least feasible budget;
with ``--cuda-graphs``, each memplan plan is made for CUDA graphs and measured both run plainly
and replayed as CUDA graphs (``graphed_row``).
Measured as in bench/core.py (peak after ``reset_peak_memory_stats``, median of 5 steps after 2
warm-ups); reserved is ``max_memory_reserved`` over those steps, after emptying the cache.

    python bench/gpu.py --model resnet50 [--compile [--no-eager]] [--budgets 75% minimum]
                        [--no-anchors | --anchors] [--offload [only]] [--cuda-graphs] [--channels-last] [--no-tf32]
                        [--deterministic] [--tag part2] --out-dir bench/results

writes ``gpu_<model>[_compiled][_<tag>].md`` (``_compiled`` with ``--no-eager``: the table,
device, torch version and command) and
the same ``.json`` (the rows, for bench/pareto.py). ``--compile`` runs that take longer than one
device call are split by ``--budgets`` and ``--no-anchors`` into processes with their own naive
row.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint_sequential

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import densenet  # noqa: E402
import resnet1001  # noqa: E402
from core import (GiB, SequentialCheckpoint, _efficient, _hf_checkpointing, gpt2_medium,  # noqa: E402
                  least_budget, measure, step)

import memplan  # noqa: E402

BUDGETS = ("75%", "50%", "30%")
COMPILE_BUDGETS = (1.0, 0.5, 0.2)


class SqrtSegments(torch.nn.Module):
    """``checkpoint_sequential`` with √n segments over a flat list of blocks, then a head.

    In-place ReLUs are turned off in this baseline only: one at a segment boundary would write
    the segment's saved input."""

    def __init__(self, blocks: list[torch.nn.Module], head: torch.nn.Module):
        super().__init__()
        self.blocks = torch.nn.Sequential(*blocks)
        self.head = head
        for module in self.modules():
            if isinstance(module, torch.nn.ReLU):
                module.inplace = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segments = round(math.sqrt(len(self.blocks)))
        return self.head(checkpoint_sequential(self.blocks, segments, x, use_reentrant=False))


def _vgg_segments(model) -> SqrtSegments:
    head = torch.nn.Sequential(model.avgpool, torch.nn.Flatten(1), model.classifier)
    return SqrtSegments(list(model.features), head)


def _resnet_segments(model) -> SqrtSegments:
    stem = [model.conv1, model.bn1, model.relu, model.maxpool]
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    head = torch.nn.Sequential(model.avgpool, torch.nn.Flatten(1), model.fc)
    return SqrtSegments(stem + blocks, head)


def _torchvision_densenet(efficient: bool):
    import torchvision

    return torchvision.models.DenseNet(growth_rate=32, block_config=(6, 12, 64, 48),
                                       num_init_features=64, memory_efficient=efficient)


def _memory_efficient(model):
    """torchvision's DenseNet with its per-layer checkpointing switched on."""
    for module in model.modules():
        if hasattr(module, "memory_efficient"):
            module.memory_efficient = True
    return model


def _images(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, device="cuda")


MODELS = {
    "densenet100": ("DenseNet-BC-100 k=12, batch 64×3×32×32", lambda: densenet.model(100, 12),
                    _efficient, lambda: _images(64, 32)),
    "densenet264": ("DenseNet-264 k=32, batch 16×3×224×224", lambda: _torchvision_densenet(False),
                    _memory_efficient, lambda: _images(16, 224)),
    "resnet1001": ("ResNet-1001 pre-act, batch 64×3×32×32", lambda: resnet1001.model(1001),
                   SequentialCheckpoint, lambda: _images(64, 32)),
    "resnet164": ("ResNet-164 pre-act, batch 64×3×32×32", lambda: resnet1001.model(164),
                  SequentialCheckpoint, lambda: _images(64, 32)),
    "gpt2m": ("GPT-2 medium (HF, eager attention, dropout 0.1), 8×1024 tokens", gpt2_medium,
              _hf_checkpointing, lambda: torch.randint(0, 50257, (8, 1024), device="cuda")),
    "gpt2m_sdpa": ("GPT-2 medium (HF, SDPA attention, dropout 0.1), 8×1024 tokens",
                   lambda: gpt2_medium("sdpa"), _hf_checkpointing,
                   lambda: torch.randint(0, 50257, (8, 1024), device="cuda")),
    "vgg19": ("VGG19 (torchvision), batch 64×3×224×224",
              lambda: __import__("torchvision").models.vgg19(), _vgg_segments, lambda: _images(64, 224)),
    "resnet50": ("ResNet-50 (torchvision), batch 64×3×224×224",
                 lambda: __import__("torchvision").models.resnet50(), _resnet_segments,
                 lambda: _images(64, 224)),
}


CUDA_GRAPHS = False  # plan memplan's rows for CUDA graphs and replay them so too (``--cuda-graphs``)
# beside each memplan row, the same budget planned with offload (``--offload``), or "only" that
OFFLOAD: bool | str = False
ANCHORS = False  # torch.compile's rows without memplan compiled (``--anchors``)
CHANNELS_LAST = False  # the model and its input in channels-last layout (``--channels-last``)
ROWS: list[dict] = []  # every row measured so far, written out after each (a run may time out)
WRITE = None


def measured(config: str, module, x, **extra) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    peak, ms = measure(module, x)
    row = dict(config=config, peak=peak, reserved=torch.cuda.max_memory_reserved(), ms=ms,
               mallocs=measure.device_allocs, **extra)
    print(row, flush=True)
    ROWS.append(row)
    if WRITE is not None:
        WRITE()
    return row


def torch_compile_row(model, x, budget: float) -> dict:
    torch._dynamo.reset()
    torch._functorch.config.activation_memory_budget = budget
    try:
        start = time.perf_counter()
        compiled = torch.compile(model)
        compiled(x).float().sum().backward()
        compile_s = time.perf_counter() - start
        return measured(f"torch.compile activation_memory_budget={budget}", compiled, x,
                        plan_s=compile_s, kind="torch.compile")
    finally:
        torch._functorch.config.activation_memory_budget = 1.0


def memplan_row(model, x, budget, label: str, compile: bool, offload: bool = False) -> dict:
    torch._dynamo.reset()
    start = time.perf_counter()
    plan = memplan.optimize(model, budget, example_inputs=(x,), compile=compile,
                            cuda_graphs=CUDA_GRAPHS, offload=offload)
    plan.module.cuda_graphs = False  # measured plainly first, then replayed (``graphed_row``)
    plan.module(x).float().sum().backward()
    plan_s = time.perf_counter() - start
    chosen = plan._result().chosen
    mode = ("compiled" if compile else "eager") + (" + offload" if offload else "")
    numbers = dict(predicted=plan.predicted_peak_bytes, budget=plan.budget_bytes,
                   predicted_ms=(chosen.step_s + chosen.recompute_s + chosen.stall_s) * 1e3,
                   minimum=plan.minimum_budget_bytes)
    row = measured(f"memplan {mode} {label} ({plan.method})", plan.module, x, plan_s=plan_s,
                   kind=f"memplan {mode}", **numbers)
    if CUDA_GRAPHS:
        try:
            graphed_row(plan.module, x, f"memplan {mode} {label} ({plan.method}) + CUDA graphs",
                        kind=f"memplan {mode} + CUDA graphs", **numbers)
        except Exception:  # a capture that fails is this row's result: reported
            traceback.print_exc()
    return row


def graph_pool_bytes() -> tuple[int, int]:
    """Bytes reserved and allocated in CUDA graph pools (every pool but the default one)."""
    segments = [s for s in torch.cuda.memory_snapshot() if tuple(s["segment_pool_id"]) != (0, 0)]
    return sum(s["total_size"] for s in segments), sum(s["allocated_size"] for s in segments)


def graphed_row(module, x, config: str, **extra) -> dict:
    """The same plan replayed as CUDA graphs. A replay allocates nothing: it reuses the
    capture's allocations, at the same addresses, so the peak is the larger of the capture
    step's ``max_memory_allocated`` and the replays'; the graphs' pool, reserved between steps,
    is recorded beside it. Outputs, gradients and buffers over two steps are compared with the
    plain module's from the same state, and the plain module's with its own (cuDNN's default
    algorithms need not be deterministic)."""
    # Kept on the host: a copy on the device would be in the capture's peak.
    state = [t.detach().to("cpu", copy=True) for t in (*module.parameters(), *module.buffers())]
    rng = torch.cuda.get_rng_state()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    module.cuda_graphs = True
    step(module, x)
    torch.cuda.synchronize()
    capture_peak = torch.cuda.max_memory_allocated()
    pool_reserved, pool_allocated = graph_pool_bytes()
    row = measured(config, module, x, capture_peak=capture_peak, pool_reserved=pool_reserved,
                   pool_allocated=pool_allocated, **extra)
    row["replay_peak"] = row["peak"]
    row["peak"] = max(row["replay_peak"], capture_peak)

    def two_steps(graphs: bool) -> list[torch.Tensor]:
        for target, value in zip((*module.parameters(), *module.buffers()), state):
            target.detach().copy_(value)
        torch.cuda.set_rng_state(rng)
        module.cuda_graphs = graphs
        seen = []
        for _ in range(2):
            for p in module.parameters():
                p.grad = None
            out = module(x)
            out.float().sum().backward()
            seen += [out.detach().clone(), *(p.grad.clone() for p in module.parameters()
                                             if p.grad is not None),
                     *(b.clone() for b in module.buffers())]
        return seen

    def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[bool, float]:
        return (len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b)),
                max((u.double() - v.double()).abs().max().item() for u, v in zip(a, b)))

    graphed, plain = two_steps(True), two_steps(False)
    row["bitwise_equal_to_plain"], row["max_abs_diff_vs_plain"] = compare(graphed, plain)
    row["plain_bitwise_equal_to_plain"], row["plain_max_abs_diff"] = compare(plain, two_steps(False))
    print(config, {k: row[k] for k in ("capture_peak", "replay_peak", "pool_reserved",
                                       "bitwise_equal_to_plain", "max_abs_diff_vs_plain",
                                       "plain_bitwise_equal_to_plain", "plain_max_abs_diff")},
          flush=True)
    if WRITE is not None:
        WRITE()
    return row


def memplan_rows(model, x, compile: bool, budgets: list[str]) -> list[dict]:
    """At each budget, then at the least budget any of those plans (or the refusal) named."""
    rows, minimum = [], None
    for budget in (b for b in budgets if b != "minimum"):
        try:
            if OFFLOAD != "only":
                rows.append(memplan_row(model, x, budget, budget, compile))
            if OFFLOAD:
                rows.append(memplan_row(model, x, budget, budget, compile, offload=True))
            minimum = rows[-1]["minimum"] if minimum is None else min(minimum, rows[-1]["minimum"])
        except memplan.InfeasibleBudgetError as error:
            print(f"memplan {budget} infeasible: {error}", flush=True)
            minimum = error.minimum_bytes if minimum is None else min(minimum, error.minimum_bytes)
    if "minimum" not in budgets:
        return rows
    if minimum is None:  # only the minimum asked
        minimum = least_budget(model, x, compile, cuda_graphs=CUDA_GRAPHS)
    try:
        rows.append(memplan_row(model, x, minimum, "minimum", compile))
    except memplan.InfeasibleBudgetError as error:  # a budget-dependent solver reached less above it
        print(f"memplan minimum {minimum} infeasible, retrying at {error.minimum_bytes}: {error}")
        rows.append(memplan_row(model, x, error.minimum_bytes, "minimum", compile))
    return rows


def run(name: str, compile: bool, eager: bool, anchors: list[float], budgets: list[str]) -> None:
    """The configurations of one model; the rows land in ROWS."""
    _title, build, checkpointed, inputs = MODELS[name]
    torch.manual_seed(0)
    model, x = build().cuda(), inputs()
    if CHANNELS_LAST:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    measured("naive eager", model, x, kind="naive eager")
    measured("built-in checkpointing", checkpointed(copy.deepcopy(model)), x,
             kind="built-in checkpointing")
    if compile or ANCHORS:
        for budget in anchors:
            try:
                torch_compile_row(model, x, budget)
            except Exception as error:  # an inductor failure is this baseline's result: reported
                print(f"torch.compile {budget} failed: {type(error).__name__}: {error}"[:300])
    if eager:
        memplan_rows(model, x, compile=False, budgets=budgets)
    if compile:
        memplan_rows(model, x, compile=True, budgets=budgets)


def table(rows: list[dict]) -> str:
    lines = ["| configuration | peak GiB | reserved GiB | predicted peak GiB | error | budget GiB "
             "| within budget | step ms | vs naive | predicted ms | cudaMalloc in timed steps "
             "| plan+compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        predicted, budget = r.get("predicted"), r.get("budget")
        lines.append("| {} | {:.3f} | {:.3f} | {} | {} | {} | {} | {:.1f} | {:+.1%} | {} | {} | {} |".format(
            r["config"], r["peak"] / GiB, r["reserved"] / GiB,
            f"{predicted / GiB:.3f}" if predicted else "–",
            f"{r['peak'] / predicted - 1:+.2%}" if predicted else "–",
            f"{budget / GiB:.3f}" if budget else "–",
            ("yes" if r["peak"] <= budget else "**no**") if budget else "–",
            r["ms"], r["ms"] / rows[0]["ms"] - 1,
            f"{r['predicted_ms']:.1f}" if "predicted_ms" in r else "–", r.get("mallocs", "–"),
            f"{r['plan_s']:.0f}" if "plan_s" in r else "–"))
    graphed = [r for r in rows if "bitwise_equal_to_plain" in r]
    if graphed:
        lines += ["", "CUDA graphs rows: peak is the larger of the capture step's and the "
                  "replays' (the pool is reserved between steps); two steps' outputs, "
                  "gradients and buffers against the same plan run plainly from the same state, "
                  "and the plain run against itself:", ""]
        lines += [f"- {r['config']}: capture {r['capture_peak'] / GiB:.3f} GiB, replay "
                  f"{r['replay_peak'] / GiB:.3f} GiB (pool {r['pool_reserved'] / GiB:.3f} GiB "
                  f"reserved, {r['pool_allocated'] / GiB:.3f} allocated); against plain: "
                  + _equality(r["bitwise_equal_to_plain"], r["max_abs_diff_vs_plain"])
                  + "; plain against plain: "
                  + _equality(r["plain_bitwise_equal_to_plain"], r["plain_max_abs_diff"])
                  for r in graphed]
    return "\n".join(lines)


def _equality(bitwise: bool, max_abs: float) -> str:
    return "bitwise equal" if bitwise else f"max abs difference {max_abs:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--compile", action="store_true",
                        help="add torch.compile's rows and memplan compiled")
    parser.add_argument("--no-eager", action="store_true", help="leave out memplan eager")
    parser.add_argument("--no-anchors", action="store_true", help="leave out torch.compile's rows")
    parser.add_argument("--anchors", action="store_true",
                        help="torch.compile's rows without --compile's memplan compiled rows")
    parser.add_argument("--anchor-budgets", nargs="+", type=float, default=list(COMPILE_BUDGETS),
                        help="torch.compile's activation_memory_budget values")
    parser.add_argument("--budgets", nargs="*", default=[*BUDGETS, "minimum"])
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="add each memplan plan replayed as CUDA graphs")
    parser.add_argument("--offload", nargs="?", const=True, default=False, choices=[True, "only"],
                        metavar="only",
                        help="add each memplan budget planned with offload=True; "
                             "'--offload only' plans with offload only")
    parser.add_argument("--channels-last", action="store_true",
                        help="the model and its input in channels-last memory format, every row")
    parser.add_argument("--no-tf32", action="store_true",
                        help="full fp32: TF32 off for convolutions and matmuls")
    parser.add_argument("--deterministic", action="store_true",
                        help="cuDNN's deterministic algorithms (for a bitwise comparison)")
    parser.add_argument("--tag", help="suffix of the output files")
    parser.add_argument("--out-dir", type=Path)
    args = parser.parse_args()
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if args.deterministic:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    title = MODELS[args.model][0]
    stem = "_".join(["gpu", args.model] + ["compiled"] * args.no_eager + [args.tag] * bool(args.tag))
    command = f"python bench/gpu.py {' '.join(sys.argv[1:])}"
    precision = ("fp32, TF32 off" if args.no_tf32 else "fp32") + (
        ", cuDNN deterministic" if args.deterministic else "") + (
        ", channels-last" if args.channels_last else "")
    header = (f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {precision}; {title}\n"
              f"command: {command}\n")

    def write() -> None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"{stem}.md").write_text(header + "\n" + table(ROWS) + "\n")
        (args.out_dir / f"{stem}.json").write_text(json.dumps(
            dict(model=title, device=torch.cuda.get_device_name(), torch=torch.__version__,
                 command=command, rows=ROWS), indent=1))

    global WRITE, CUDA_GRAPHS, OFFLOAD, ANCHORS, CHANNELS_LAST
    WRITE = write if args.out_dir else None
    CUDA_GRAPHS, OFFLOAD, ANCHORS = args.cuda_graphs, args.offload, args.anchors
    CHANNELS_LAST = args.channels_last
    run(args.model, args.compile, eager=not args.no_eager,
        anchors=[] if args.no_anchors else args.anchor_budgets, budgets=args.budgets)
    print(header + "\n" + table(ROWS))


if __name__ == "__main__":
    main()
