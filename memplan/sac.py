"""A plan as a selective-checkpointing policy, for ``torch.utils.checkpoint``.

Selective checkpointing asks a policy about every ATen op the checkpointed function runs, below
autograd, in program order: save its outputs, or recompute them in backward. The plan's graph
was traced at the same level, so the policy walks the plan's forward nodes alongside the ops it
is asked about and answers from the plan's saved set. The graph is functionalized where eager
is not (``relu_`` is ``relu`` there; batch norm is ``_native_batch_norm_legit_functional`` in
the graph and ``native_batch_norm`` or ``cudnn_batch_norm`` in eager), so ops are compared by
family; an op the graph does not have (``detach``, an alias) is recomputed, which costs nothing.

Selective checkpointing cannot cache a value that the model's eager code computes or overwrites
in place (``relu_`` on a BatchNorm output, ``out += x``); capture finds those in the exported
graph, and the policy recomputes them.
"""

from __future__ import annotations

import operator
import warnings
from collections import defaultdict
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy

from memplan.graph import CUDA_ALLOCATOR_ROUNDING, JointGraph, Phase, allocated_bytes
from memplan.passes.dropout import draw, replay
from memplan.program import Program

# How many nodes of its family the policy may skip to find an op's node: eager runs a few ops
# the functional graph does not have (detach, alias, a mask's arithmetic) and the other way round.
LOOKAHEAD = 4


def op_name(target: Any) -> str:
    """How the IR names an fx node's target: ``aten.relu.default``, a Python function by its
    qualified name, a placeholder by its own name."""
    if target is operator.getitem:
        return "getitem"
    if callable(target) and not isinstance(target, torch._ops.OpOverload):
        return f"{target.__module__}.{target.__qualname__}"
    return str(target)


def op_family(op: str) -> str:
    """``aten.relu_.default`` → ``relu``; every batch-norm variant → ``batch_norm``."""
    name = op.removeprefix("aten.").rsplit(".", 1)[0] if op.startswith("aten.") else op
    if "batch_norm" in name:
        return "batch_norm"
    if name in ("conv1d", "conv2d", "conv3d", "cudnn_convolution", "convolution"):
        return "convolution"
    # CPU dropout draws its mask in place, CUDA's is fused; the graph reads a draw's replay
    if name.startswith("bernoulli") or name == _REPLAY:
        return "native_dropout"
    name = name.lstrip("_").removesuffix("_functional").removesuffix("_")
    return "view" if name in ("unsafe_view", "reshape", "reshape_alias") else name


# Ops selective checkpointing never asks about (``SAC_IGNORED_OPS``): saving one saves its input.
_UNASKED = ("aten.detach.default",)
# A dropout's draw, whose saved output is the generator state: torch.utils.checkpoint keeps
# that state itself. Its replay is what eager's dropout returns.
_DRAW, _REPLAY = op_name(draw), op_name(replay)


def saved_ops(graph: JointGraph, program: Program) -> frozenset[str]:
    """The forward op nodes whose outputs the plan saves (a saved getitem saves its op), less
    those eager computes or overwrites in place (see ``unsaveable_ops``)."""
    return frozenset(n for n in _saved_op_nodes(graph, program) if not graph[n].written_in_place)


def unsaveable_ops(graph: JointGraph, program: Program) -> frozenset[str]:
    """Saved by the plan, but computed or overwritten in place by the model's eager code
    (``relu_`` and the BatchNorm output it writes): selective checkpointing cannot cache them,
    so they are recomputed."""
    return frozenset(n for n in _saved_op_nodes(graph, program) if graph[n].written_in_place)


def _saved_op_nodes(graph: JointGraph, program: Program) -> set[str]:
    ops: set[str] = set()
    for name in program.saved:
        node = graph[name]
        while node.phase is Phase.FORWARD and (node.op == "getitem" or node.op in _UNASKED):
            node = graph[node.inputs[0]]
        if node.phase is Phase.FORWARD and node.op != _DRAW:
            ops.add(node.name)
    return ops


def _rounded(nbytes: int) -> int:
    """Storage sizes compared as the CUDA allocator rounds them, as the graph records them there."""
    return allocated_bytes(nbytes, CUDA_ALLOCATOR_ROUNDING)


def _output_bytes(ctx: Any) -> int | None:
    output = getattr(ctx, "op_output", None)
    if isinstance(output, (tuple, list)):
        output = output[0] if output else None
    if not isinstance(output, torch.Tensor):
        return None
    return _rounded(output.untyped_storage().nbytes())


class PlanPolicy:
    """A policy function for ``create_selective_checkpoint_contexts``: one per checkpoint call.

    The k-th call of an op family in eager is matched to the k-th graph node of that family
    (checked by output size, skipping at most a few nodes), so an op one side has and the other
    lacks shifts only its own family. ``matched`` lists, for the forward pass, the graph node
    each op was matched to (None where there is none) and ``kept`` those it saved, to check the
    policy followed the plan.
    """

    def __init__(self, graph: JointGraph, program: Program):
        self._families: dict[str, list[tuple[str, int | None]]] = defaultdict(list)
        for node in graph.nodes_of(Phase.FORWARD):
            if node.op != "getitem":
                nbytes = _rounded(graph.storages[node.storages[0]].nbytes) if node.storages else None
                self._families[op_family(node.op)].append((node.name, nbytes))
        self._saved = saved_ops(graph, program)
        restated = sorted(graph[n].module_path or n for n in unsaveable_ops(graph, program)
                          if graph[n].state_inputs)
        if restated:
            warnings.warn(
                f"memplan: the model overwrites the output of {len(restated)} training BatchNorm(s) "
                f"in place ({', '.join(restated[:3])}{', ...' if len(restated) > 3 else ''}), so "
                "selective checkpointing must recompute them, and each recomputation updates the "
                "running statistics again. Use inplace=False for the ops after them, or train with "
                "plan.module, which updates them once.", stacklevel=3)
        # Forward and recompute (torch < 2.14 asks the policy again) walk the graph separately.
        self._position: dict[tuple[bool, str], int] = defaultdict(int)
        self.matched: list[str | None] = []
        self.kept: list[str] = []  # the nodes it answered MUST_SAVE for, in the forward pass

    def __call__(self, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        recompute = bool(getattr(ctx, "is_recompute", False))
        node = self._match(op_family(str(op)), _output_bytes(ctx), recompute)
        if not recompute:
            self.matched.append(node)
        # Selective checkpointing cannot cache an in-place op's output: autograd bumps its
        # version after the policy has seen it. Recomputing it is exact (the RNG is replayed).
        if node in self._saved and not op._schema.is_mutable:
            if not recompute:
                self.kept.append(node)
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    def _match(self, family: str, nbytes: int | None, recompute: bool) -> str | None:
        nodes = self._families.get(family, [])
        start = self._position[recompute, family]
        for i in range(start, min(start + LOOKAHEAD, len(nodes))):
            name, candidate_bytes = nodes[i]
            if nbytes is None or candidate_bytes in (None, nbytes):
                self._position[recompute, family] = i + 1
                return name
        return None
