"""Predicted against measured step time, for the analytic model with a per-op host cost.

On the lent GPU's host, eager steps of many small ops are bound by the host's dispatch of each
op, and step times vary between steps by up to 2.7× (``step_noise_h200.md``). So each plan is timed
in interleaved rounds, and the least time of the rounds is compared: it is the step's own cost,
the others add the host's noise. Predicted times are the plan's ops priced at
max(host cost, launch + roofline) for several host costs.

    python bench/diag/time_model.py densenet100|resnet164|gpt2m [ROUNDS]
"""

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import core  # noqa: E402
import densenet  # noqa: E402
import resnet1001  # noqa: E402

import memplan  # noqa: E402
from memplan.cost_models.analytic import AnalyticCostModel, for_device  # noqa: E402

MODELS = {"densenet100": (lambda: densenet.model(100, 12), lambda: torch.randn(64, 3, 32, 32)),
          "resnet164": (lambda: resnet1001.model(164), lambda: torch.randn(64, 3, 32, 32)),
          "gpt2m": (core.gpt2_medium, lambda: torch.randint(0, 50257, (8, 1024)))}
HOST_US = (0, 10, 20, 30, 40)


def predicted_ms(plan, host_us: float) -> float:
    rates = for_device("cuda", torch.cuda.get_device_name()).rates
    model = AnalyticCostModel(dataclasses.replace(rates, dispatch_s=host_us * 1e-6))
    result = plan._result()
    nodes = {node.name: node for node in result.graph.nodes}
    program = result.chosen.program
    return 1e3 * sum(model.node_time_s(nodes[name]) for name in (*program.forward, *program.backward))


def main(name: str, rounds: int) -> None:
    torch.manual_seed(0)
    build, inputs = MODELS[name]
    model, x = build().cuda(), inputs().cuda()
    plans = {"none": memplan.optimize(model, "1000GB", example_inputs=(x,), method="none")}
    for budget in ("75%", "50%", "30%"):
        plans[budget] = memplan.optimize(model, budget, example_inputs=(x,))
    plans["minimum"] = memplan.optimize(model, core.least_budget(model, x), example_inputs=(x,))
    modules = {"naive": model, **{label: plan.module for label, plan in plans.items()}}
    for module in modules.values():
        for _ in range(2):
            core.step(module, x)
    times = {label: [] for label in modules}
    for _ in range(rounds):
        for label, module in modules.items():
            times[label].append(core.timed_step_ms(module, x))
    print(f"{name}, {torch.cuda.get_device_name()}, {rounds} interleaved rounds; "
          f"predicted ms at host cost (µs) {HOST_US}")
    print("| configuration | method | least ms | median ms | "
          + " | ".join(f"predicted {h} µs" for h in HOST_US) + " |")
    print("|---|---|---|---|" + "---|" * len(HOST_US))
    for label, values in times.items():
        plan = plans.get(label)
        predicted = [f"{predicted_ms(plan, h):.1f}" if plan else "–" for h in HOST_US]
        print(f"| {label} | {plan.method if plan else '–'} | {min(values):.1f} | "
              f"{sorted(values)[len(values) // 2]:.1f} | " + " | ".join(predicted) + " |")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10)
