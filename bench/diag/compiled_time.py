"""Where a compiled step's time goes: per configuration, the step time, the device kernels' summed
time and count in one profiled step, and what the kernels do not cover (host time not hidden).

Compiling DenseNet-BC-100 takes minutes, so each configuration runs in its own process and the
processes compile at once; with ``--parties N`` each then waits until N processes have
compiled, and they measure one at a time (a lock file in ``--sync``), so that no measurement
shares the host with a compile.

    python bench/diag/compiled_time.py densenet100 CONFIG [--parties N --sync DIR] [--out DIR]
                                       [--check [--no-tf32] [--no-cudnn]] [--channels-last]

CONFIG is ``eager``, ``torch.compile[:BUDGET]`` (activation_memory_budget, default 1.0),
``memplan:BUDGET`` (memplan eager), ``compiled:BUDGET[:OPS[:METHOD]]`` (memplan compiled; BUDGET may
be ``none`` for method="none", OPS is ops per segment or ``whole``) or ``graphed:...`` (the same,
replayed as CUDA graphs). The row ends with the first step's peak, which compiles the backward
(and, graphed, warms up and captures). ``--out`` receives the
kernels' names, times and counts as JSON, for comparing two configurations. ``--check``
first runs one step of the model in eager PyTorch and one of the configuration from the same
random state, and prints how far the loss and gradients differ (dropout masks drawn otherwise
would show as a different loss); ``--no-tf32`` runs convolutions and matmuls in full fp32,
``--no-cudnn`` ATen's kernels where eager would call cuDNN (BatchNorm's above all: memplan's
graphs call ATen's).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402
import gpu  # noqa: E402
from executor_overhead import kernels  # noqa: E402

import memplan  # noqa: E402
import memplan.inductor  # noqa: E402


def build(config: str, model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.nn.Module, dict]:
    kind, _, rest = config.partition(":")
    if kind == "eager":
        return model, {}
    if kind == "torch.compile":
        torch._functorch.config.activation_memory_budget = float(rest or 1.0)
        return torch.compile(model), {}
    budget, _, ops = rest.partition(":")
    ops, _, method = ops.partition(":")
    if ops:
        memplan.inductor.OPS_PER_SEGMENT = 10**9 if ops == "whole" else int(ops)
    options = dict(method=method) if method else dict(method="none") if budget == "none" else {}
    compile, cuda_graphs = kind in ("compiled", "graphed"), kind == "graphed"
    if budget == "minimum":
        budget = core.least_budget(model, x, compile=compile, cuda_graphs=cuda_graphs)
    plan = memplan.optimize(model, "1TB" if budget == "none" else budget, example_inputs=(x,),
                            compile=compile, cuda_graphs=cuda_graphs, **options)
    chosen = plan._result().chosen
    return plan.module, dict(method=plan.method, predicted_gib=plan.predicted_peak_bytes / 2**30,
                             budget_gib=plan.budget_bytes / 2**30,
                             predicted_ms=(chosen.step_s + chosen.recompute_s) * 1e3)


def check_against_eager(model: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor) -> str:
    """One step of each from the same random state: the loss difference and the largest gradient
    difference relative to the gradient's largest magnitude, over all parameters.

    The loss weighs the outputs by fixed random numbers. A plain sum gives every sample the same
    output gradient, which BatchNorm's backward mostly cancels (it subtracts the gradient's batch
    mean), leaving the earlier gradients near rounding noise: on the CPU, DenseNet-40's compiled
    gradients differed from eager's by 15% of their largest magnitude under a sum, by 5.5e-6
    under this loss."""
    weights = None
    results = []
    for run in (model, module):
        torch.manual_seed(1)
        for p in model.parameters():
            p.grad = None
        out = run(x).float()
        if weights is None:
            weights = torch.randn(out.shape, device=out.device,
                                  generator=torch.Generator(out.device).manual_seed(2))
        loss = (out * weights).sum()
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (eager_loss, eager_grads), (loss, grads) = results
    relative = max(((g - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
                   for e, g in zip(eager_grads, grads))
    del results, eager_grads, grads
    for p in model.parameters():
        p.grad = None
    torch.cuda.empty_cache()
    return f"loss eager {eager_loss:.6g} vs {loss:.6g}, max relative grad difference {relative:.2e}"


def wait_for_turn(sync: Path, parties: int) -> int:
    """Wait until every process has compiled (or failed to), then take the lock."""
    while len(list(sync.glob("*.ready"))) < parties:
        time.sleep(1)
    lock = os.open(sync / "lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=gpu.MODELS)
    parser.add_argument("config")
    parser.add_argument("--parties", type=int, default=1)
    parser.add_argument("--sync", type=Path, default=Path("/tmp/compiled_time_sync"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--no-tf32", action="store_true",
                        help="convolutions and matmuls in full fp32 (cuDNN's default is TF32)")
    parser.add_argument("--channels-last", action="store_true",
                        help="the model and its input in channels-last memory format")
    parser.add_argument("--no-cudnn", action="store_true",
                        help="ATen's kernels where eager PyTorch would call cuDNN")
    args = parser.parse_args()
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if args.no_cudnn:
        torch.backends.cudnn.enabled = False
    _title, make, _checkpointed, inputs = gpu.MODELS[args.model]
    torch.manual_seed(0)
    model, x = make().cuda(), inputs()
    if args.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    try:
        module, facts = build(args.config, model, x)
        if module is not model:
            torch.cuda.reset_peak_memory_stats()
            core.step(module, x)  # compiles the backward; CUDA graphs are captured
            facts["first_step_peak"] = torch.cuda.max_memory_allocated()
        facts["plan_compile_s"] = round(time.perf_counter() - start, 1)
    finally:  # a process that failed must not keep the others waiting
        args.sync.mkdir(parents=True, exist_ok=True)
        (args.sync / f"{os.getpid()}.ready").touch()
    torch.cuda.empty_cache()  # the device's memory is for the one measuring
    lock = wait_for_turn(args.sync, args.parties) if args.parties > 1 else None
    if args.check:
        facts["check"] = check_against_eager(model, module, x)
    peak, ms = core.measure(module, x, repeats=10)
    if args.config.startswith("graphed"):  # replays allocate nothing: the capture's peak counts
        peak = max(peak, facts["first_step_peak"])
    by_name, _host = kernels(module, x)
    kernel_ms = sum(map(sum, by_name.values())) / 1e3
    launches = sum(map(len, by_name.values()))
    if lock is not None:
        os.close(lock)
    print(f"| {args.config} | {peak / 2**30:.3f} | {facts.get('predicted_gib', float('nan')):.3f} "
          f"| {ms:.1f} | {kernel_ms:.1f} | {launches} | {ms - kernel_ms:.1f} "
          f"| {facts.get('budget_gib', float('nan')):.3f} "
          f"| {facts.get('predicted_ms', float('nan')):.1f} | {facts['plan_compile_s']} "
          f"| {facts.get('method', '')} | {facts.get('first_step_peak', 0) / 2**30:.3f} "
          f"| {facts.get('check', '')} |", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = args.config.replace(":", "_").replace("%", "pct")
        (args.out / f"{args.model}_{name}.json").write_text(json.dumps(dict(
            config=args.config, peak=peak, ms=ms, **facts,
            kernels={k: [round(sum(v), 1), len(v)] for k, v in by_name.items()})))


if __name__ == "__main__":
    main()
