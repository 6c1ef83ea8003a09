"""An offloading plan's gradients against eager's, and where its step's time goes.

Two steps from the same state and seed: eager, memplan at the budget without offload, and
with it. Reports the largest relative gradient difference of each planned step against eager,
and of eager against itself, then the offload plan's transfers: bytes each way, the predicted
link time and waits, and the measured step beside the plain plan's.

    python bench/diag/offload.py [MODEL] [BUDGET] [--compile]      (defaults: gpt2m_sdpa 6.8GiB)

With ``--compile`` both plans are compiled by inductor.
"""

import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402
import gpu  # noqa: E402

import memplan  # noqa: E402

GiB = 2**30


def gradients(module, x, seed: int) -> list[torch.Tensor]:
    for p in module.parameters():
        p.grad = None
    torch.manual_seed(seed)
    module(x).float().sum().backward()
    return [p.grad.detach().cpu() for p in module.parameters()]  # off the device: not planned


def largest_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b))


def times_of(plan) -> dict[str, float]:
    from memplan.cost_models import for_device
    return for_device("cuda", torch.cuda.get_device_name()).times(plan._result().graph)


def split_times(module, x, repeats: int = 3) -> tuple[float, float]:
    """Median forward and backward times (ms), each timed alone."""
    forward, backward = [], []
    for _ in range(repeats):
        for p in module.parameters():
            p.grad = None
        start, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        torch.cuda.synchronize()
        start.record()
        loss = module(x).float().sum()
        middle.record()
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        forward.append(start.elapsed_time(middle))
        backward.append(middle.elapsed_time(end))
    return sorted(forward)[repeats // 2], sorted(backward)[repeats // 2]


def main(name: str, budget: str, compile: bool) -> None:
    title, build, _checkpointed, inputs = gpu.MODELS[name]
    torch.manual_seed(0)
    model, x = build().cuda(), inputs()
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    eager = [gradients(model, x, seed=7) for _ in range(2)]
    print(f"{title}, budget {budget}{', compiled' if compile else ''}")
    print(f"eager against eager: {largest_difference(eager[1], eager[0]):.3g}")
    forward_ms, backward_ms = split_times(model, x)
    print(f"eager: forward {forward_ms:.1f} ms, backward {backward_ms:.1f} ms")
    for offload in (False, True):
        model.load_state_dict(state)
        plan = memplan.optimize(model, budget, example_inputs=(x,), offload=offload,
                                compile=compile)
        planned = gradients(plan.module, x, seed=7)
        chosen = plan._result().chosen
        graph = plan._result().graph
        times = times_of(plan)
        peak, ms = core.measure(plan.module, x)
        print(f"offload={offload}: {plan.method}, against eager {largest_difference(planned, eager[0]):.3g}; "
              f"peak {peak / GiB:.3f} GiB (predicted {plan.predicted_peak_bytes / GiB:.3f}), "
              f"{ms:.1f} ms (predicted {(chosen.step_s + chosen.recompute_s + chosen.stall_s) * 1e3:.1f}: "
              f"recompute {chosen.recompute_s * 1e3:.1f}, waits {chosen.stall_s * 1e3:.1f})")
        forward_ms, backward_ms = split_times(plan.module, x)
        recomputed = Counter()
        for step in chosen.program.backward:
            if graph[step].phase.value == "forward":
                recomputed[graph[step].op] += times[step]
        print(f"  forward {forward_ms:.1f} ms, backward {backward_ms:.1f} ms; recomputed: "
              + ", ".join(f"{op} {t * 1e3:.1f}" for op, t in recomputed.most_common(8)))
        if offload:
            moved = sum(graph.storages[graph[t.name].storages[0]].nbytes
                        for t in chosen.program.offloaded)
            ops = sorted({graph[t.name].op for t in chosen.program.offloaded})
            print(f"  {len(chosen.program.offloaded)} values offloaded, {moved / GiB:.2f} GiB each "
                  f"way, {moved / 55e9 * 1e3:.1f} ms at 55 GB/s; ops: {', '.join(ops)}")
        del plan


if __name__ == "__main__":
    positional = [a for a in sys.argv[1:] if a != "--compile"]
    main(*(positional or ["gpt2m_sdpa", "6.8GiB"]), compile="--compile" in sys.argv)
