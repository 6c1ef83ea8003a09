"""Why a planned step can take longer than its kernels and host ops explain: synchronisations,
the garbage collector, or the order of measurement.

Measures DenseNet-BC-100 (batch 64×3×32×32) naive, memplan ``none`` and memplan at 75% in
interleaved rounds, then the 75% plan with the garbage collector off, and runs one 75% step under
``torch.cuda.set_sync_debug_mode("warn")``, which warns at every synchronising call.

    python bench/diag/step_noise.py
"""

import gc
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import core  # noqa: E402
import densenet  # noqa: E402

import memplan  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    model = densenet.model(100, 12).cuda()
    x = torch.randn(64, 3, 32, 32, device="cuda")
    modules = {"naive": model,
               "none": memplan.optimize(model, "100GB", example_inputs=(x,), method="none").module,
               "75%": memplan.optimize(model, "75%", example_inputs=(x,)).module}
    for module in modules.values():
        for _ in range(3):
            core.step(module, x)
    times = {name: [] for name in modules}
    collecting = {}
    gc_ms = {name: [0.0, 0.0, 0.0] for name in modules}

    def on_collection(phase: str, info: dict) -> None:
        if phase == "start":
            collecting["start"] = time.perf_counter()
        elif current:
            gc_ms[current[0]][info["generation"]] += (time.perf_counter() - collecting["start"]) * 1e3

    current: list[str] = []
    gc.callbacks.append(on_collection)
    for _ in range(10):
        for name, module in modules.items():
            current[:] = [name]
            times[name].append(core.timed_step_ms(module, x))
    current.clear()
    gc.callbacks.remove(on_collection)
    print("garbage collection ms over the 10 rounds, by generation:", gc_ms)
    print("objects tracked by the collector:", len(gc.get_objects()))
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.1f} ms, min {min(values):.1f}, "
              f"max {max(values):.1f} (10 interleaved rounds)")
    gc.collect()
    gc.disable()
    for name, module in modules.items():
        values = [core.timed_step_ms(module, x) for _ in range(10)]
        print(f"{name}, garbage collector off: median {statistics.median(values):.1f} ms, "
              f"min {min(values):.1f}, max {max(values):.1f}")
    gc.enable()
    print("collections so far per generation:", [s["collections"] for s in gc.get_stats()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        core.step(modules["75%"], x)
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message)[:120] for w in caught if "synchron" in str(w.message).lower()]
    print(f"synchronising calls in one 75% step: {len(syncs)}", *syncs[:5], sep="\n  ")


if __name__ == "__main__":
    main()
