"""Where a planned step's time goes, against what the cost models predict.

For one model: the naive eager step, memplan with nothing recomputed (``none``: the executor's
own cost), and memplan at the built-in baseline's budget; beside each, the step time the
``analytic`` and ``profile`` models predict (sum of the node times of everything that runs).

    python bench/diag/step_time.py densenet|resnet1001
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import core  # noqa: E402
import densenet  # noqa: E402
import resnet1001  # noqa: E402

import memplan  # noqa: E402
from memplan.cost_models import for_device  # noqa: E402


def predicted_ms(result, times) -> float:
    program = result.chosen.program
    return 1e3 * sum(times.get(name, 0.0) for name in (*program.forward, *program.backward))


def main(name: str) -> None:
    torch.manual_seed(0)
    model = (densenet.model(100, 12) if name == "densenet" else resnet1001.model()).cuda()
    x = torch.randn(64, 3, 32, 32, device="cuda")
    _, eager_ms = core.measure(model, x)
    print(f"{name}: naive eager {eager_ms:.1f} ms", flush=True)
    for method, budget in (("none", "100GB"), ("auto", "50%"), ("log", "100%")):
        plan = memplan.optimize(model, budget, example_inputs=(x,), method=method,
                                cost_model="profile")
        _, ms = core.measure(plan.module, x)
        result = plan._result()
        analytic = for_device("cuda", torch.cuda.get_device_name()).times(result.graph)
        profiled = result.chosen
        print(f"{name}: memplan {method} {budget} ({plan.method}): measured {ms:.1f} ms; predicted "
              f"step {predicted_ms(result, analytic):.1f} ms analytic, "
              f"{1e3 * (profiled.step_s + profiled.recompute_s):.1f} ms profile; predicted overhead "
              f"+{plan.predicted_overhead:.1%} (profile), measured vs eager {ms / eager_ms - 1:+.1%}",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
