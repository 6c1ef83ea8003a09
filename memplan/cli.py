"""``memplan plan FILE --budget B``: plan the model an example file defines and print the report.

An example file defines ``model()`` and ``example_inputs()``; the plan runs on the CPU unless
``--device`` says otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

import memplan
from memplan.api import METHODS


def load_example(path: str):
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"memplan: no such example file: {path}")
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[file.stem] = module
    spec.loader.exec_module(module)
    for name in ("model", "example_inputs"):
        if not callable(getattr(module, name, None)):
            raise SystemExit(f"memplan: {path} must define {name}()")
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memplan", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="plan an example file's model and print the report")
    plan.add_argument("example", help="a Python file defining model() and example_inputs()")
    plan.add_argument("--budget", default="60%", help="bytes, '8GB', '512MiB', '60%%', 0.6 or 'auto'")
    plan.add_argument("--method", default="auto", choices=METHODS)
    plan.add_argument("--batch-size", type=int, default=None, help="passed to example_inputs()")
    plan.add_argument("--device", default="cpu")
    plan.add_argument("--offload", action="store_true",
                      help="let saved values wait in host memory (CUDA devices)")
    plan.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    example = load_example(args.example)
    model = example.model().to(args.device)
    inputs = example.example_inputs(args.batch_size) if args.batch_size else example.example_inputs()
    inputs = tuple(t.to(args.device) if isinstance(t, torch.Tensor) else t for t in inputs)
    budget = args.budget
    if budget.isdigit():
        budget = int(budget)
    try:
        result = memplan.optimize(model, budget, example_inputs=inputs, method=args.method,
                                  offload=args.offload)
    except (memplan.BudgetError, memplan.InfeasibleBudgetError, memplan.CaptureError,
            ValueError) as error:
        print(f"memplan: {str(error).removeprefix('memplan: ')}", file=sys.stderr)
        return 2
    print(result.to_json() if args.json else result.report())
    return 0
