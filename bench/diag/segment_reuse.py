"""How many of a compiled plan's segments share a compilation, and what that saves in compile
time, on the CPU: memplan's compiled path with and without ``REUSE_IDENTICAL_SEGMENTS``.

    python bench/diag/segment_reuse.py MODEL [--budget 50%] [--batch N] [--count-only] [--no-reuse]

MODEL is ``densenet100``, ``gpt2m`` or ``resnetD`` (pre-activation ResNet of depth D, e.g.
resnet164, resnet1001). ``--count-only`` replaces inductor's compiler by a stub, to count the
forward's and backward's segments and compilations in the time of planning alone. Inductor's
caches are off, so every run compiles from scratch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch._inductor.compile_fx as compile_fx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import core  # noqa: E402
import densenet  # noqa: E402
import resnet1001  # noqa: E402

import memplan  # noqa: E402
import memplan.inductor as inductor  # noqa: E402


def build(name: str, batch: int) -> tuple[torch.nn.Module, torch.Tensor]:
    if name == "densenet100":
        return densenet.model(100, 12), torch.randn(batch, 3, 32, 32)
    if name == "gpt2m":
        return core.gpt2_medium(), torch.randint(0, 50257, (batch, 1024))
    if name.startswith("resnet"):
        return resnet1001.model(int(name.removeprefix("resnet"))), torch.randn(batch, 3, 32, 32)
    raise SystemExit(f"unknown model {name!r}: densenet100, gpt2m or resnetD")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--budget", default="50%")
    parser.add_argument("--batch", type=int, help="default: 64 images, 8 sequences")
    parser.add_argument("--count-only", action="store_true")
    parser.add_argument("--no-reuse", action="store_true")
    args = parser.parse_args()
    inductor.REUSE_IDENTICAL_SEGMENTS = not args.no_reuse
    torch._inductor.config.force_disable_caches = True
    # the stub's forward cannot run, so the backward is compiled with it
    torch._functorch.config.force_non_lazy_backward_lowering = args.count_only
    segment_count = 0
    segment_key = inductor._segment_key

    def counting_key(*key_args):
        nonlocal segment_count
        segment_count += 1
        return segment_key(*key_args)

    inductor._segment_key = counting_key  # called once per segment where reuse is on
    compilations = 0
    compile_inner = compile_fx.compile_fx_inner

    def counting_compile(graph, inputs, **options):
        nonlocal compilations
        compilations += 1
        if args.count_only:
            return lambda boxed_args: None
        return compile_inner(graph, inputs, **options)

    compile_fx.compile_fx_inner = counting_compile
    torch.manual_seed(0)
    model, x = build(args.model, args.batch or (8 if args.model == "gpt2m" else 64))
    def counts() -> str:  # without reuse, each segment is a compilation
        segments = compilations if args.no_reuse else segment_count
        return f"{segments} segments, {compilations} compilations"

    start = time.perf_counter()
    plan = memplan.optimize(model, args.budget, example_inputs=(x,), compile=True)
    line = (f"{args.model} at {args.budget}, reuse {'off' if args.no_reuse else 'on'}: "
            f"plan and compile {time.perf_counter() - start:.1f} s, {counts()}")
    if not args.count_only:  # the backward, which aot_autograd compiles at the first step
        start = time.perf_counter()
        core.step(plan.module, x)
        line += f"; first step {time.perf_counter() - start:.1f} s, {counts()} in all"
    print(line, flush=True)


if __name__ == "__main__":
    main()
