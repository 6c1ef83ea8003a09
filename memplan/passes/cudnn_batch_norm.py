"""Run training BatchNorms on cuDNN where eager PyTorch does.

aot_autograd traces BatchNorm into ATen's own kernels (``_native_batch_norm_legit``,
``native_batch_norm_backward``): torch decomposes ``cudnn_batch_norm`` so that inductor can fuse
it. Eager PyTorch on CUDA calls cuDNN wherever ``torch._C._select_batch_norm_backend`` picks
it. The two round differently, so a planned step on ATen's BatchNorm is not bitwise eager's, and
ATen's BatchNorm launches more kernels. For the eager executor, this pass gives each training
BatchNorm of the planned graphs back to cuDNN where eager would call it: same arguments, the
running statistics updated in place as before. A BatchNorm for which cuDNN would keep a
reserve space is left alone: the backward would need it saved, and the plan has no room for it.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._prims_common import suggest_memory_format

aten = torch.ops.aten


def use_cudnn_batch_norm(graph_module: fx.GraphModule) -> None:
    """Rewrite ``graph_module``'s training BatchNorms, forward and backward, to cuDNN's."""
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.target is aten._native_batch_norm_legit.default and node.args[5]:
            if _eager_calls_cudnn(*node.args[:3], node.args[7]):
                node.target = aten.cudnn_batch_norm.default  # the same arguments, in order
        elif node.target is aten._native_batch_norm_legit.no_stats and node.args[3]:
            source, weight, bias, training, momentum, eps = node.args
            if _eager_calls_cudnn(source, weight, bias, eps):
                node.target = aten.cudnn_batch_norm.default
                node.args = (source, weight, bias, None, None, training, momentum, eps)
        elif node.target is aten.native_batch_norm_backward.default and node.args[7]:
            grad, source, weight, mean, var, save_mean, save_invstd, _train, eps, _mask = node.args
            if _eager_calls_cudnn(source, weight, None, eps) and _dense_like(grad, source):
                with graph.inserting_before(node):
                    reserve = graph.call_function(
                        aten.empty.memory_format, ([0],),
                        dict(dtype=torch.uint8, device=source.meta["val"].device))
                node.target = aten.cudnn_batch_norm_backward.default
                node.args = (source, grad, weight, mean, var, save_mean, save_invstd, eps, reserve)
    graph_module.recompile()


def _eager_calls_cudnn(source: fx.Node, weight: object, bias: object, eps: float) -> bool:
    """Eager's choice for a training BatchNorm on this input (``_batch_norm_impl_index``), and
    cuDNN keeps no reserve space for it. The backward has no bias; the forward's had one, or it
    was not on cuDNN and the backward's choice does not matter for exactness."""
    value = source.meta.get("val")
    weight_value = weight.meta.get("val") if isinstance(weight, fx.Node) else None
    if not (isinstance(value, torch.Tensor) and value.is_cuda and weight_value is not None):
        return False
    bias_value = bias.meta.get("val") if isinstance(bias, fx.Node) else weight_value
    if bias_value is None or not _dense_like(source, source):
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
