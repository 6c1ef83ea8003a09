"""Where a CUDA-graph capture's memory goes, stage by stage, against the same plan run plainly.

Plans the model for CUDA graphs, runs two plain steps, then the first graphed step, logging the
allocated bytes and the peak since the last stage at: cuBLAS workspaces cleared, each graph's
capture begun and ended, and the step's end (the first replay).

    python bench/diag/graph_capture.py resnet1001 1.15GiB
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402
import gpu  # noqa: E402

import memplan  # noqa: E402

MiB = 2**20


def log(stage: str) -> None:
    print(f"| {stage} | {torch.cuda.memory_allocated() / MiB:.1f} | "
          f"{torch.cuda.max_memory_allocated() / MiB:.1f} |", flush=True)
    torch.cuda.reset_peak_memory_stats()


class LoggedGraph(torch.cuda.graph):
    def __enter__(self):
        log("before a capture (peak: since the last stage: the warm-up, or the last capture)")
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        log("capture ended")
        return result


def main() -> None:
    name, budget = sys.argv[1], sys.argv[2]
    _title, make, _checkpointed, inputs = gpu.MODELS[name]
    torch.manual_seed(0)
    model, x = make().cuda(), inputs()
    plan = memplan.optimize(model, budget, example_inputs=(x,), cuda_graphs=True)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; {name} at {budget}: "
          f"predicted {plan.predicted_peak_bytes / MiB:.1f} MiB "
          f"(CUDA graphs {plan._result().graphs_bytes / MiB:.1f} MiB of it)\n")
    print("| stage | allocated MiB | peak since last stage MiB |\n|---|---|---|")
    plan.module.cuda_graphs = False
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        core.step(plan.module, x)
    log("two plain steps ended")
    clear = torch._C._cuda_clearCublasWorkspaces

    def logged_clear():
        log("before cuBLAS workspaces cleared")
        clear()
        log("cuBLAS workspaces cleared")

    torch._C._cuda_clearCublasWorkspaces = logged_clear
    torch.cuda.graph = LoggedGraph
    plan.module.cuda_graphs = True
    core.step(plan.module, x)
    log("first graphed step ended (capture and first replay)")
    core.step(plan.module, x)
    log("second graphed step ended")


if __name__ == "__main__":
    main()
