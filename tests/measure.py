"""The judge of predicted peaks: PyTorch's own MemTracker, sharing no code with memplan."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch.distributed._tools.mem_tracker import MemTracker


def floating_tensors_in(value) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]


def measured_step_peak(module: torch.nn.Module, inputs: tuple, kwargs: dict | None = None) -> int:
    """Peak bytes of one training step: parameters, gradients, inputs, activations, temporaries."""
    kwargs = kwargs or {}
    for p in module.parameters():
        p.grad = None
    tracker = MemTracker()
    tracker.track_external(module, *[t for t in pytree.tree_leaves((inputs, kwargs))
                                     if isinstance(t, torch.Tensor)])
    with tracker:
        out = module(*inputs, **kwargs)
        sum(t.float().sum() for t in floating_tensors_in(out)).backward()
    device = next(iter(module.parameters())).device
    return tracker.get_tracker_snapshot("peak")[device]["Total"]
