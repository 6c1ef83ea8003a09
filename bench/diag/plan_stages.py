"""Where a compiled plan's planning and compiling time goes: ``compiled_time.py`` with each
stage of ``memplan.optimize`` timed (export, aot_autograd's trace of the joint graph, the
decompositions copied into it (BatchNorm's, ReLU's backward, detach), planning, splitting,
segmenting, inductor's compilations, the wait for those run in worker processes) and memplan's
log at INFO (each solver's time: on large graphs the fast solvers run side by side, so planning
takes less than their sum). A stage the timed memplan does not have is left out, so an older
checkout can be timed with its own copy of this script.

    python bench/diag/plan_stages.py MODEL CONFIG [--serial] [compiled_time.py's options]
    python bench/diag/plan_stages.py --run segment_reuse.py MODEL --count-only [--budget B]

``--serial`` runs the fast solvers one after another whatever the graph's size. ``--run`` times
another script of this directory instead: ``segment_reuse.py --count-only`` plans and segments
on the CPU, inductor stubbed.

The stages' times and call counts are printed after compiled_time.py's row, or when the process
is interrupted (``timeout -s INT``); what they leave of its plan+compile time is aot_autograd's
other work and the first step. A last line gives the
seconds the process spent in Python's garbage collections, in all and within each stage (the
innermost running), their count, and the process's maximum resident memory.
"""

from __future__ import annotations

import atexit
import collections
import functools
import gc
import logging
import resource
import runpy
import sys
import time
from pathlib import Path

import torch._functorch.aot_autograd as aot_autograd
import torch._inductor.compile_fx as compile_fx

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]
import memplan.api as api  # noqa: E402
import memplan.capture as capture  # noqa: E402
import memplan.inductor as inductor  # noqa: E402
import memplan.solvers.registry as registry  # noqa: E402

try:
    from memplan.compile_workers import _CompiledInWorker
except ImportError:  # a memplan that compiles every segment in its own process
    _CompiledInWorker = None

spent: collections.Counter[str] = collections.Counter()
calls: collections.Counter[str] = collections.Counter()
running: list[str] = []  # the stages now running, innermost last
collecting: collections.Counter[str] = collections.Counter()  # seconds by stage


def count_collections(phase: str, info: dict) -> None:
    stage = running[-1] if running else "elsewhere"
    if phase == "start":
        collecting[stage] -= time.perf_counter()
    else:
        collecting[stage] += time.perf_counter()
        calls["garbage collections"] += 1


def print_stages() -> None:
    print("stages: " + ", ".join(f"{label} {spent[label]:.1f} s ({calls[label]})" for label in spent))
    print(f"garbage collections: {sum(collecting.values()):.1f} s ({calls['garbage collections']}); "
          + ", ".join(f"in {stage} {seconds:.1f} s" for stage, seconds in collecting.items())
          + f"; maximum resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB",
          flush=True)


def timed(module, name: str, label: str) -> None:
    function = getattr(module, name, None) if module is not None else None
    if function is None:  # a stage that the memplan timed does not have
        return

    @functools.wraps(function)
    def counted(*args, **kwargs):
        start = time.perf_counter()
        running.append(label)
        try:
            return function(*args, **kwargs)
        finally:
            running.pop()
            spent[label] += time.perf_counter() - start
            calls[label] += 1

    setattr(module, name, counted)


STAGES = [(capture, "_flat_module", "export"),
          (aot_autograd, "aot_stage1_graph_capture", "aot_autograd's trace"),
          (inductor, "decompose_by_template", "copied decompositions"),
          (capture, "measure_workspaces", "workspaces"),
          (capture, "joint_to_ir", "IR"), (api, "plan_step", "planning"),
          (capture, "split", "split"), (capture, "simulate", "fused-kernel simulation"),
          (inductor, "compile_in_segments", "segmenting and compiling"),
          (compile_fx, "compile_fx_inner", "of which inductor"),
          (_CompiledInWorker, "load", "waiting for workers and loading")]

if __name__ == "__main__":
    for stage in STAGES:
        timed(*stage)
    gc.callbacks.append(count_collections)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("memplan").setLevel(logging.INFO)
    atexit.register(print_stages)
    if "--serial" in sys.argv:
        sys.argv.remove("--serial")
        registry.PARALLEL_MIN_NODES = sys.maxsize
    script = "compiled_time.py"
    if "--run" in sys.argv:
        at = sys.argv.index("--run")
        script = sys.argv.pop(at + 1)
        sys.argv.pop(at)
    sys.argv = [str(HERE / script), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
