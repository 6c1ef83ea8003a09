"""The chain DP's leaner keeps on the device: each memplan row of ``bench/gpu.py`` planned twice
in one process, with leaner keeps (memplan's default) and without (``dp_keeps=0``, the chain DP
before them), measured the same way. With ``--cpu``, planned only, on this machine, by each of
``--methods``: the predicted recomputation and the planning time.

    python bench/diag/stage_keeps.py MODEL [--budgets 75% 50% 30%] [--compile] [--out FILE]
    python bench/diag/stage_keeps.py MODEL --cpu [--budgets 50%] [--methods auto cpsat chen-greedy]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu  # noqa: E402

import memplan.api  # noqa: E402
from memplan.solvers.base import SolverConfig  # noqa: E402


KEEPS = ((SolverConfig.dp_keeps, "leaner keeps"), (0, "without"))
CPU_INPUTS = {"densenet100": lambda: torch.randn(64, 3, 32, 32),
              "resnet1001": lambda: torch.randn(64, 3, 32, 32),
              "gpt2m": lambda: torch.randint(0, 50257, (8, 1024))}


@contextlib.contextmanager
def stage_keeps(count: int):
    memplan.api.SolverConfig = functools.partial(SolverConfig, dp_keeps=count)
    try:
        yield
    finally:
        memplan.api.SolverConfig = SolverConfig


def on_device(args) -> str:
    title, build, _checkpointed, inputs = gpu.MODELS[args.model]
    torch.manual_seed(0)
    model, x = build().cuda(), inputs()
    gpu.measured("naive eager", model, x, kind="naive eager")
    for budget in args.budgets:
        for keeps, label in KEEPS:
            with stage_keeps(keeps):
                try:
                    gpu.memplan_row(model, x, budget, f"{budget}, {label}", args.compile)
                except memplan.InfeasibleBudgetError as error:
                    print(f"{budget} {label}: {error}", flush=True)
    return (f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, fp32; {title}\n"
            f"command: python bench/diag/stage_keeps.py {' '.join(sys.argv[1:])}\n\n"
            + gpu.table(gpu.ROWS) + "\n")


def on_cpu(args) -> str:
    title, build, *_ = gpu.MODELS[args.model]
    torch.manual_seed(0)
    model, x = build(), CPU_INPUTS[args.model]()
    lines = [f"device: this machine's CPU, torch {torch.__version__}; {title}; planned only",
             f"command: python bench/diag/stage_keeps.py {' '.join(sys.argv[1:])}", "",
             "| budget | method | chain DP | chosen | predicted recomputation | predicted peak GiB "
             "| plan s | solve s |", "|---|---|---|---|---|---|---|---|"]
    for budget in args.budgets:
        for method in args.methods:
            for keeps, label in KEEPS if method in ("auto", "chain-dp", "cpsat") else KEEPS[:1]:
                with stage_keeps(keeps):
                    start = time.perf_counter()
                    plan = memplan.optimize(model, budget, example_inputs=(x,), method=method)
                    chosen = plan._result().chosen
                    lines.append(f"| {budget} | {method} | {label} | {chosen.method} | "
                                 f"{chosen.overhead:+.1%} | {chosen.peak_bytes / 2**30:.3f} | "
                                 f"{time.perf_counter() - start:.1f} | {chosen.solve_time_s:.1f} |")
                    print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=sorted(gpu.MODELS))
    parser.add_argument("--budgets", nargs="+", default=list(gpu.BUDGETS))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--methods", nargs="+", default=["auto", "cpsat", "chen-greedy"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = on_cpu(args) if args.cpu else on_device(args)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
