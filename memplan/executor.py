"""Run the planned graphs: a module that shares the user's parameters and plans per input shape.

Each fx graph runs with the boxed calling convention: it receives its inputs in a list that it
clears at once, so every saved value is freed at its last use in backward, as the simulator
assumes. No dynamo and no tracing happen at call time.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx._lazy_graph_module import _LazyGraphModule

from memplan.cuda_graphs import check_gradients_cleared, graphed_step
from memplan.passes.offload import wait_for_copies

_BoxedCodeGen = getattr(fx.graph, "_BoxedCodeGen", None)


def boxed(gm: fx.GraphModule) -> Callable[[list], Any]:
    """Compile an fx graph so that it takes, and clears, a list of inputs."""
    gm.graph.set_codegen(_BoxedCodeGen())
    gm.recompile()
    _LazyGraphModule.force_recompile(gm)  # it runs: write its code now, not in the first step

    def run(args: list) -> Any:
        try:
            return gm.forward(args)
        except BaseException:
            wait_for_copies()  # before the failed step's values are freed
            raise

    run._boxed_call = True  # read by aot_autograd's runtime
    return run


def signature(flat_inputs: list[Any], training: bool) -> tuple:
    """What a plan depends on: shapes, dtypes, devices, strides-free, and the training flag."""
    return (training, tuple((tuple(t.shape), t.dtype, t.device.type, t.requires_grad)
                            if isinstance(t, torch.Tensor) else ("const", repr(t))
                            for t in flat_inputs))


class PlannedModule(torch.nn.Module):
    """Drop-in for the user's model: same parameter objects, same state_dict keys.

    It shares the model's parameter, buffer and submodule dictionaries, so ``state_dict``,
    ``parameters()``, ``train()`` and optimizers see exactly the model's own tensors. In eval
    mode or without grad it calls the model itself.
    """

    def __init__(self, model: torch.nn.Module, plan_for: Callable[[tuple, dict], Any], *,
                 cuda_graphs: bool = False):
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_plan_for", plan_for)
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._modules = model._modules
        self._steps: dict[tuple, Any] = {}
        self.cuda_graphs = cuda_graphs  # replay each signature's step (``memplan.cuda_graphs``)
        self._graphed: dict[tuple, Callable[..., tuple]] = {}

    def prepare(self, args: tuple, kwargs: dict) -> Any:
        """Plan for these inputs now (they may be fake or real) unless already planned."""
        flat = pytree.tree_leaves((args, kwargs))
        key = signature(flat, self._model.training)
        if key not in self._steps:
            self._steps[key] = self._plan_for(args, kwargs)
        return self._steps[key]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not (self._model.training and torch.is_grad_enabled()):
            return self._model(*args, **kwargs)
        flat = pytree.tree_leaves((args, kwargs))
        step, out_spec = self.prepare(args, kwargs)
        if self.cuda_graphs:
            check_gradients_cleared(self._model, flat)
            key = signature(flat, self._model.training)
            if key not in self._graphed:
                self._graphed[key] = graphed_step(self._model, step, flat)
            outputs = self._graphed[key](*flat)
        else:
            outputs = step.run(*flat)
        return pytree.tree_unflatten(list(outputs), out_spec)

    def train(self, mode: bool = True) -> "PlannedModule":
        self._model.train(mode)
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"planned {type(self._model).__name__}, {len(self._steps)} input signature(s)"
