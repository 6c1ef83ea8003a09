"""``none``: PyTorch's default saved set, everything backward reads is kept."""

from memplan.graph import JointGraph
from memplan.program import build_program, candidates
from memplan.solvers.base import SolverConfig, StepSchedule, evaluate


def solve(graph: JointGraph, budget_bytes: int, *, config: SolverConfig) -> StepSchedule:
    program = build_program(graph, (n.name for n in candidates(graph)))
    return evaluate(graph, program, budget_bytes, method="none", config=config)
