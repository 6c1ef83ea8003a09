"""What memplan's executor adds to a step when it recomputes nothing: kernels or host time.

For one model, naive eager against memplan with ``method="none"`` (every value kept): the median
step time, the summed time and count of the device kernels in one profiled step, and the kernel
names whose total time or count differ most. Where the kernel time is equal and the step is
slower, the difference is host time (Python, launches) not hidden behind the device's work.

    python bench/diag/executor_overhead.py densenet100|resnet1001|resnet164
"""

import collections
import cProfile
import pstats
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import core  # noqa: E402
import densenet  # noqa: E402
import resnet1001  # noqa: E402

import memplan  # noqa: E402

MODELS = {"densenet100": lambda: densenet.model(100, 12),
          "resnet1001": lambda: resnet1001.model(1001),
          "resnet164": lambda: resnet1001.model(164)}


def kernels(module, x) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Kernel name -> durations in µs, and host op name -> self time in µs, over one profiled
    step (after the warm-ups of measure)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        core.step(module, x)
        torch.cuda.synchronize()
    by_name = collections.defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_name[event.name[:90]].append(event.time_range.elapsed_us())
    host = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    return by_name, host


def summary(label: str, module, x) -> dict[str, list[float]]:
    _, ms = core.measure(module, x)
    by_name, host = kernels(module, x)
    total = sum(sum(d) for d in by_name.values()) / 1e3
    count = sum(len(d) for d in by_name.values())
    print(f"{label}: step {ms:.1f} ms; device kernels {total:.1f} ms in {count} launches; "
          f"not covered by kernels {ms - total:.1f} ms; host ops' self time (profiled) "
          f"{sum(host.values()) / 1e3:.1f} ms", flush=True)
    return by_name, host


def table(header: str, eager: dict, planned: dict, measure, rows: int) -> None:
    """The keys whose measure differs most between eager and memplan."""
    diffs = []
    for key in eager.keys() | planned.keys():
        a, b = measure(eager.get(key, [])), measure(planned.get(key, []))
        diffs.append((b[0] - a[0], b[1] - a[1], *a, *b, key))
    diffs.sort(key=lambda r: -abs(r[0]))
    print(f"| Δ µs | Δ count | eager µs | eager count | memplan µs | memplan count | {header} |")
    print("|---|---|---|---|---|---|---|")
    for row in diffs[:rows]:
        print("| {:+.0f} | {:+d} | {:.0f} | {} | {:.0f} | {} | `{}` |".format(*row))


def main(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().cuda()
    x = torch.randn(64, 3, 32, 32, device="cuda")
    eager_kernels, eager_host = summary(f"{name} naive eager", model, x)
    plan = memplan.optimize(model, "100GB", example_inputs=(x,), method="none")  # no limit
    planned_kernels, planned_host = summary(f"{name} memplan none", plan.module, x)
    table("kernel", eager_kernels, planned_kernels, lambda d: (sum(d), len(d)), 15)
    table("host op (self time)", eager_host, planned_host, lambda t: (t or 0.0, 0), 25)
    profiler = cProfile.Profile()
    profiler.enable()
    core.step(plan.module, x)
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main(sys.argv[1])
