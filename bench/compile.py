"""GPU benchmark of the compiled path against torch.compile's own activation_memory_budget, on
DenseNet-BC-100 (k=12, 64×3×32×32): the strongest anchor where it compiles.

Same protocol as bench/core.py (peak after reset, median of 5 steps after 2 warm-ups, one process,
same inputs).

    python bench/compile.py --out bench/results/compile_<device>.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import densenet  # noqa: E402
from core import GiB, measure  # noqa: E402

import memplan  # noqa: E402


def torch_compile_row(model, x, budget: float) -> dict:
    torch._dynamo.reset()
    torch._functorch.config.activation_memory_budget = budget
    start = time.perf_counter()
    compiled = torch.compile(model)
    compiled(x).float().sum().backward()
    compile_s = time.perf_counter() - start
    peak, ms = measure(compiled, x)
    torch._functorch.config.activation_memory_budget = 1.0
    return dict(config=f"torch.compile activation_memory_budget={budget}", peak=peak, ms=ms,
                plan_s=compile_s)


def memplan_row(model, x, budget, compile: bool) -> tuple[dict, int]:
    torch._dynamo.reset()
    start = time.perf_counter()
    plan = memplan.optimize(model, budget, example_inputs=(x,), compile=compile)
    plan.module(x).float().sum().backward()
    plan_s = time.perf_counter() - start
    peak, ms = measure(plan.module, x)
    label = f"memplan {'compiled' if compile else 'eager'} {budget if isinstance(budget, str) else 'minimum'}"
    return dict(config=f"{label} ({plan.method})", peak=peak, ms=ms, plan_s=plan_s,
                predicted=plan.predicted_peak_bytes, budget=plan.budget_bytes), plan.minimum_budget_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = densenet.model(100, 12).cuda()
    x = torch.randn(64, 3, 32, 32, device="cuda")
    rows = []
    peak, ms = measure(model, x)
    rows.append(dict(config="naive eager", peak=peak, ms=ms))
    for budget in (1.0, 0.5, 0.2):
        try:
            rows.append(torch_compile_row(model, x, budget))
        except Exception as error:  # an inductor failure is a result of this baseline, reported
            print(f"torch.compile budget {budget} failed: {type(error).__name__}: {error}"[:300])
            continue
        print(rows[-1], flush=True)
    row, minimum = memplan_row(model, x, "50%", compile=True)
    rows.append(row)
    print(rows[-1], flush=True)
    for compile in (True, False):
        rows.append(memplan_row(model, x, minimum, compile=compile)[0])
        print(rows[-1], flush=True)
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, fp32, "
             "DenseNet-BC-100 k=12, batch 64×3×32×32",
             f"command: python bench/compile.py {' '.join(sys.argv[1:])}", "",
             "| configuration | measured peak GiB | predicted (eager) GiB | budget GiB | step ms | compile+plan s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| {} | {:.3f} | {} | {} | {:.1f} | {} |".format(
            r["config"], r["peak"] / GiB,
            f"{r['predicted'] / GiB:.3f}" if "predicted" in r else "–",
            f"{r['budget'] / GiB:.3f}" if "budget" in r else "–", r["ms"],
            f"{r['plan_s']:.0f}" if "plan_s" in r else "–"))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
