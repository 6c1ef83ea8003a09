"""Run training BatchNorms on cuDNN where eager PyTorch does.

aot_autograd traces BatchNorm into ATen's own kernels (``_native_batch_norm_legit``,
``native_batch_norm_backward``): torch decomposes ``cudnn_batch_norm`` so that inductor can fuse
it. Eager PyTorch on CUDA calls cuDNN wherever ``torch._C._select_batch_norm_backend`` picks
it. The two round differently, so a planned step on ATen's BatchNorm is not bitwise eager's, and
ATen's BatchNorm launches more kernels. For the eager executor, this pass gives training
BatchNorms of the planned graphs back to cuDNN where eager would call it: same arguments, the
running statistics updated in place as before. Left on ATen's kernels: a BatchNorm for which
cuDNN would keep a reserve space (the backward would need it saved, and the plan has no room for
it), one whose input or gradient is not dense in its memory format (eager copies them first),
one whose buffers stay functional (``update_buffers_in_place``), and a backward that needs no
input gradient (cuDNN's would compute one the plan does not hold).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._prims_common import suggest_memory_format

aten = torch.ops.aten


def use_cudnn_batch_norm(graph_module: fx.GraphModule, on_cudnn: set[str]) -> None:
    """Rewrite ``graph_module``'s training BatchNorms to cuDNN's. Call it on the forward graph,
    then on the backward graph with the same ``on_cudnn``: it records the forward's choices by
    node name, so that a recomputation and a backward follow their forward (the graphs keep the
    joint graph's names, and a value saved for backward is a placeholder of its name)."""
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.target is aten._native_batch_norm_legit.default and node.args[5]:
            if _eager_calls_cudnn(*node.args[:3], node.args[7]):
                node.target = aten.cudnn_batch_norm.default  # the same arguments, in order
                _record(node, on_cudnn)
        elif node.target is aten._native_batch_norm_legit.no_stats and node.name in on_cudnn:
            source, weight, bias, training, momentum, eps = node.args
            node.target = aten.cudnn_batch_norm.default
            node.args = (source, weight, bias, None, None, training, momentum, eps)
            _record(node, on_cudnn)
        elif node.target is aten.native_batch_norm_backward.default:
            grad, source, weight, mean, var, save_mean, save_invstd, train, eps, mask = node.args
            # cuDNN computes every gradient: one the plan does not hold (mask) stays on ATen.
            if (train and mask[0] and isinstance(save_mean, fx.Node) and save_mean.name in on_cudnn
                    and _dense_like(grad, source)):
                with graph.inserting_before(node):
                    reserve = graph.call_function(
                        aten.empty.memory_format, ([0],),
                        dict(dtype=torch.uint8, device=source.meta["val"].device))
                reserve.meta["val"] = source.meta["val"].new_empty((0,), dtype=torch.uint8)
                node.target = aten.cudnn_batch_norm_backward.default
                node.args = (source, grad, weight, mean, var, save_mean, save_invstd, eps, reserve)
    graph_module.recompile()


def _record(node: fx.Node, on_cudnn: set[str]) -> None:
    on_cudnn.add(node.name)
    on_cudnn.update(user.name for user in node.users if user.target is operator.getitem)


def _eager_calls_cudnn(source: fx.Node, weight: object, bias: object, eps: float) -> bool:
    """Eager's choice for a training BatchNorm on this input (``_batch_norm_impl_index``), and
    cuDNN keeps no reserve space for it."""
    value, weight_value, bias_value = (
        a.meta.get("val") if isinstance(a, fx.Node) else None for a in (source, weight, bias))
    if not (isinstance(value, torch.Tensor) and value.is_cuda and weight_value is not None
            and bias_value is not None and _dense_like(source, source)):
        return False
    # Running statistics change the choice only outside training; the weight stands in for them.
    backend = torch._C._select_batch_norm_backend(value, weight_value, bias_value, weight_value,
                                                  weight_value, True, eps)
    return (backend == torch._C._BatchNormBackend.Cudnn
            and torch._C._get_cudnn_batch_norm_reserve_space_size(value, True) == 0)


def _dense_like(value: object, source: fx.Node) -> bool:
    """``value`` is dense in ``source``'s suggested memory format, as eager makes both before
    calling cuDNN (a copy here would be memory the plan did not see)."""
    tensor = value.meta.get("val") if isinstance(value, fx.Node) else None
    return (isinstance(tensor, torch.Tensor)
            and tensor.is_contiguous(memory_format=suggest_memory_format(source.meta["val"])))
