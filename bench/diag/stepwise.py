"""Measured against predicted memory after every node of one planned step on the GPU.

Runs the planned forward and backward graphs through an fx Interpreter that reads
``torch.cuda.memory_allocated()`` after each node and the peak within it (values are freed after
their last use, as in the generated code), and prints the nodes where the measurement first
exceeds the simulator's timeline, with the largest excess. BUDGET may be ``minimum``.

    python bench/diag/stepwise.py [BUDGET] [densenet100|resnet56|gpt2m] [METHOD]
"""

import sys
from pathlib import Path

import torch
import torch.fx as fx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import core  # noqa: E402
import densenet  # noqa: E402
import resnet1001  # noqa: E402

import memplan  # noqa: E402

MiB = 2**20
MODELS = {"densenet100": (lambda: densenet.model(100, 12), lambda: torch.randn(64, 3, 32, 32)),
          "resnet56": (lambda: resnet1001.model(56), lambda: torch.randn(64, 3, 32, 32)),
          "gpt2m": (core.gpt2_medium, lambda: torch.randint(0, 50257, (8, 1024)))}


class Recorder(fx.Interpreter):
    """Takes the boxed argument list as the generated code does, and empties it, so that each
    input is freed after its last use."""

    def __init__(self, gm: fx.GraphModule, phase: str, log: list, args: list):
        super().__init__(gm)
        self.phase, self.log = phase, log
        self.inputs = list(args)
        args.clear()
        self.inputs.reverse()

    def placeholder(self, target, args, kwargs):
        return self.inputs.pop()

    def run_node(self, node: fx.Node):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = super().run_node(node)
        if node.op == "call_function":
            torch.cuda.synchronize()
            self.log.append((f"{self.phase}:{node.name}", torch.cuda.memory_allocated(),
                             torch.cuda.max_memory_allocated()))
        return result


def main(budget: str, model_name: str, method: str) -> None:
    torch.manual_seed(0)
    build, inputs = MODELS[model_name]
    model, x = build().cuda(), inputs().cuda()
    if budget == "minimum":
        budget = core.least_budget(model, x)
    plan = memplan.optimize(model, budget, example_inputs=(x,), method=method)
    for _ in range(2):
        plan.module(x).sum().backward()
    for p in model.parameters():
        p.grad = None
    step = plan.module._steps[next(iter(plan.module._steps))][0]
    log: list = []
    for gm, phase in zip(step.fx_compiled, ("forward", "backward")):
        gm.forward = (lambda g, ph: lambda args: Recorder(g, ph, log, args).run())(gm, phase)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = plan.module(x)
    out.sum().backward()
    del out
    torch.cuda.synchronize()
    timeline = plan._result().chosen.timeline
    predicted = dict(zip(timeline.steps, timeline.live_bytes))
    print(f"{model_name} {budget} {plan.method}: measured peak "
          f"{max(r[2] for r in log) / MiB:.1f} MiB, predicted "
          f"{plan.predicted_peak_bytes / MiB:.1f} MiB at {timeline.peak_node}; "
          f"{len(log)} nodes recorded, {len(predicted)} predicted")
    rows = [(label, measured, predicted[label]) for label, measured, _ in log if label in predicted]
    i = max(range(len(log)), key=lambda k: log[k][2])
    print("around the highest peak within a node (allocated after it, peak within it, predicted):")
    for label, after, within in log[max(0, i - 8): i + 3]:
        print(f"   {label:<55} {after / MiB:8.1f}  {within / MiB:8.1f}  "
              f"{predicted.get(label, float('nan')) / MiB:8.1f}")
    worst = max(rows, key=lambda r: r[1] - r[2])
    print(f"largest excess {(worst[1] - worst[2]) / MiB:+.1f} MiB at {worst[0]}")
    excess = [measured - pred for _, measured, pred in rows]
    jumps = sorted(range(1, len(rows)), key=lambda k: excess[k - 1] - excess[k])[:12]
    print("where the excess grows (label: growth, excess after):")
    for k in sorted(jumps):
        print(f"   {rows[k - 1][0]} -> {rows[k][0]:<45} {(excess[k] - excess[k - 1]) / MiB:+6.1f}"
              f"  {excess[k] / MiB:+6.1f} MiB")
    i = [r[0] for r in rows].index(worst[0])
    for label, measured, pred in rows[max(0, i - 8): i + 3]:
        print(f"   {label:<55} measured {measured / MiB:8.1f}  predicted {pred / MiB:8.1f}"
              f"  {(measured - pred) / MiB:+7.1f}")


if __name__ == "__main__":
    arguments = sys.argv[1:] + ["40%", "densenet100", "cpsat"][len(sys.argv) - 1:]
    main(*arguments[:3])
