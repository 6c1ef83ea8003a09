"""What memplan's executor adds to a step when it recomputes nothing: kernels or host time.

For one model, naive eager against memplan with ``method="none"`` (every value kept): the median
step time, the summed time and count of the device kernels in one profiled step, and the kernel
names whose total time or count differ most. Where the kernel time is equal and the step is
slower, the difference is host time (Python, launches) not hidden behind the device's work.
Two other configurations may be compared the same way: ``eager``, ``none``, a budget,
``torch.compile`` (activation_memory_budget 1.0) or ``compiled:<budget>`` (memplan compiled).

    python bench/diag/executor_overhead.py densenet100|resnet1001|resnet164 [eager none | 75% 30%]
    python bench/diag/executor_overhead.py densenet100 torch.compile compiled:75%
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


def table(header: str, names: tuple[str, str], first: dict, second: dict, measure,
          rows: int) -> None:
    """The keys whose measure differs most between the two configurations."""
    diffs = []
    for key in first.keys() | second.keys():
        a, b = measure(first.get(key, [])), measure(second.get(key, []))
        diffs.append((b[0] - a[0], b[1] - a[1], *a, *b, key))
    diffs.sort(key=lambda r: -abs(r[0]))
    a, b = names
    print(f"| Δ µs | Δ count | {a} µs | {a} count | {b} µs | {b} count | {header} |")
    print("|---|---|---|---|---|---|---|")
    for row in diffs[:rows]:
        print("| {:+.0f} | {:+d} | {:.0f} | {} | {:.0f} | {} | `{}` |".format(*row))


def module_for(config: str, model, x):
    """Naive eager, torch.compile, memplan recomputing nothing, or memplan at a budget."""
    if config == "eager":
        return model
    if config == "torch.compile":
        compiled = torch.compile(model)
        core.step(compiled, x)
        return compiled
    if config == "none":
        return memplan.optimize(model, "100GB", example_inputs=(x,), method="none").module
    compile = config.startswith("compiled:")
    config = config.removeprefix("compiled:")
    plan = memplan.optimize(model, config, example_inputs=(x,), compile=compile)
    print(f"{config}: {plan.method}, predicted peak {plan.predicted_peak_bytes / 2**30:.3f} GiB")
    return plan.module


def main(name: str, configs: tuple[str, str]) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().cuda()
    x = torch.randn(64, 3, 32, 32, device="cuda")
    modules = [module_for(config, model, x) for config in configs]
    (first_kernels, first_host), (second_kernels, second_host) = (
        summary(f"{name} {config}", module, x) for config, module in zip(configs, modules))
    table("kernel", configs, first_kernels, second_kernels, lambda d: (sum(d), len(d)), 15)
    table("host op (self time)", configs, first_host, second_host, lambda t: (t or 0.0, 0), 25)
    profiler = cProfile.Profile()
    profiler.enable()
    core.step(modules[1], x)
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main(sys.argv[1], tuple(sys.argv[2:4]) or ("eager", "none"))
