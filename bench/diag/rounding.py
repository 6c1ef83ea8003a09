"""How far rounding alone moves a deep pre-activation ResNet's step, and whether memplan's
compiled step equals eager's where rounding cannot hide a difference (float64).

    python bench/diag/rounding.py DEPTH [--batch 16] [--budget 50%] [--compiled-only]

One step each, from the same weights and input, on the CPU: eager float32 against eager
float64 (rounding alone), then memplan compiled in float64 against eager float64. Each row
gives both losses and the largest gradient difference relative to that gradient's largest
magnitude, over all parameters (``compiled_time.py --check``'s measure, and its loss: the
outputs weighed by fixed random numbers).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
import resnet1001  # noqa: E402

import memplan  # noqa: E402


def step(module: torch.nn.Module, parameters: torch.nn.Module, x: torch.Tensor) -> tuple[float, list]:
    for p in parameters.parameters():
        p.grad = None
    out = module(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    loss = (out * weights).sum()
    loss.backward()
    return loss.item(), [p.grad.double() for p in parameters.parameters()]


def compare(what: str, first: tuple[float, list], second: tuple[float, list]) -> None:
    relative = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
                   for a, b in zip(first[1], second[1]))
    print(f"| {what} | {first[0]:.6g} | {second[0]:.6g} | {relative:.2e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("depth", type=int)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--budget", default="50%")
    parser.add_argument("--compiled-only", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, x = resnet1001.model(args.depth), torch.randn(args.batch, 3, 32, 32)
    wide = copy.deepcopy(model).double()
    eager_wide = step(wide, wide, x.double())
    print(f"pre-activation ResNet-{args.depth}, batch {args.batch}, CPU, torch {torch.__version__}")
    print("| comparison | loss | reference loss | largest gradient difference |\n|---|---|---|---|")
    if not args.compiled_only:
        compare("eager float32 against eager float64", step(model, model, x), eager_wide)
    planned = copy.deepcopy(model).double()
    start = time.perf_counter()
    plan = memplan.optimize(planned, args.budget, example_inputs=(x.double(),), compile=True)
    print(f"planned {plan.method} at {args.budget} and compiled in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    compare(f"memplan compiled ({plan.method}, {args.budget}) against eager, float64",
            step(plan.module, planned, x.double()), eager_wide)


if __name__ == "__main__":
    main()
