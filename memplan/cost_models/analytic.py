"""A roofline: time = max(dispatch, launch + max(FLOPs / rate, bytes moved / bandwidth)).

On a fast GPU small kernels are launch-bound, so eager recomputation of many small ops costs far
more than their FLOPs say; the launch term carries that. Beyond it, the host dispatches each op
(Python, the dispatcher, the launch call) while the device runs earlier ones: an op shorter than
its dispatch costs the dispatch. Rates are measured, not datasheet: H100 and H200 rows come from
copies, matrix products and convolutions timed on those machines. The FLOP rate depends on the
math an op runs in (``Node.precision``: float32 convolutions run in TF32 on CUDA by default) and,
for TF32, on whether it is a convolution: cuDNN's reach less of the tensor cores' rate than
matrix products do. Compiled graphs (``fuses_pointwise``) run pointwise ops inside their
neighbours' kernels, so such an op is priced by what it reads from and writes to memory only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Iterator, Mapping

import torch

from memplan.graph import JointGraph, Node


@dataclass(frozen=True)
class DeviceRates:
    flops_per_s: Mapping[str, float]  # by precision ("fp32", "tf32", "bf16", "fp16"); fp32 is required
    bytes_per_s: float
    launch_s: float
    dispatch_s: float = 0.0
    host_link_bytes_per_s: float = 0.0  # pinned host memory, each way; 0: nothing to offload to
    replayed_op_s: float = 0.0  # per ATen op replayed in a CUDA graph, beyond launch and roofline
    convolution_flops_per_s: Mapping[str, float] = field(default_factory=dict)  # else flops_per_s

    def flop_rate(self, node: Node) -> float:
        rates = (self.convolution_flops_per_s if node.op.startswith(CONVOLUTIONS)
                 and node.precision in self.convolution_flops_per_s else self.flops_per_s)
        return rates.get(node.precision, self.flops_per_s["fp32"])


CONVOLUTIONS = ("aten.convolution.", "aten.convolution_backward.")


def allows_tf32(convolution: bool) -> bool:
    """Whether float32 convolutions (cuDNN) or matrix products (cuBLAS) may run in TF32. Read
    from ``fp32_precision``, which the legacy ``allow_tf32`` flags also set: reading a legacy
    flag raises once the new API has set it."""
    backend = torch.backends.cudnn.conv if convolution else torch.backends.cuda.matmul
    return backend.fp32_precision == "tf32"

# flops_per_s, on the lent H200 (bench/results/math_rates_h200.md): fp32 51 TFLOP/s, what both an
# 8192³ product and GPT-2 medium's products reach; TF32 246, GPT-2 medium's products (an 8192³
# product reaches 401, so real shapes may reach less than the bf16 figure too); bf16 785, an
# 8192³ product (no model measured); fp16 assumed equal to bf16. Fused attention is priced at
# the products' rate: in TF32 GPT-2 medium's reached 115.
# convolution_flops_per_s["tf32"]: the FLOPs of ResNet-50's (NCHW and channels-last) and
# VGG19's convolutions and their backwards over their measured time: 148 TFLOP/s, where the
# three sets reach 97, 131 and 172. Convolutions in other precisions take the products' rate:
# full-fp32 convolutions reached 26 (ResNet-50) to 61 TFLOP/s (VGG19), and no single rate
# prices both better than 51 does (run 3 there).
# The H100's rates are assumed the same.
# dispatch_s: the eager executor's host time per op on the lent H200's host, fitted to the least
# of interleaved step times of DenseNet-BC-100, ResNet-164 and GPT-2 medium plans
# (bench/results/time_model_h200.md).
# host_link_bytes_per_s: copies to and from pinned host memory on the lent H200
# (bench/results/host_link_h200.md); the H100's is assumed the same (PCIe 5), not measured.
# replayed_op_s: fitted to five CUDA-graph replays of the eager executor's plans on the lent H200
# (DenseNet-BC-100 at 30% and its least budget, twice, ResNet-1001 at 1.15 GiB), which took 5.4-6.7
# µs per op more than launch and roofline: an op launches more than one kernel (BatchNorm's
# statistics and normalisation), and small kernels ramp up and drain
# (bench/results/cuda_graphs_h200.md, "Replay time"). The H100's is assumed the same.
_H200_FLOPS = MappingProxyType({"fp32": 51e12, "tf32": 246e12, "bf16": 785e12, "fp16": 785e12})
_H200_CONVOLUTION_FLOPS = MappingProxyType({"tf32": 148e12})
DEVICES = {
    "h100": DeviceRates(flops_per_s=_H200_FLOPS, convolution_flops_per_s=_H200_CONVOLUTION_FLOPS,
                        bytes_per_s=3.0e12, launch_s=5e-6, dispatch_s=40e-6,
                        host_link_bytes_per_s=55e9, replayed_op_s=5.5e-6),
    "h200": DeviceRates(flops_per_s=_H200_FLOPS, convolution_flops_per_s=_H200_CONVOLUTION_FLOPS,
                        bytes_per_s=4.3e12, launch_s=5e-6, dispatch_s=40e-6,
                        host_link_bytes_per_s=55e9, replayed_op_s=5.5e-6),
    "cpu": DeviceRates(flops_per_s=MappingProxyType({"fp32": 100e9}), bytes_per_s=20e9, launch_s=2e-6),
}

_FREE_OPS = ("getitem", "aten.t.", "aten.view.", "aten.detach.", "aten.expand.",
             "aten.permute.", "aten.unsqueeze.", "aten.squeeze.", "aten.alias.",
             "aten._unsafe_view.", "aten.slice.", "aten.select.", "aten.transpose.")


@dataclass(frozen=True)
class AnalyticCostModel:
    rates: DeviceRates = DEVICES["cpu"]
    fuses_pointwise: bool = False  # compiled graphs: pointwise ops run inside their neighbours' kernels

    def node_time_s(self, node: Node) -> float:
        """The op as a kernel of its own; ``times`` prices pointwise ops fused where the model
        fuses them."""
        if not node.op or node.op.startswith(_FREE_OPS):
            return 0.0
        device_s = self.rates.launch_s + max(node.flops / self.rates.flop_rate(node),
                                             node.bytes_moved / self.rates.bytes_per_s)
        return max(self.rates.dispatch_s, device_s)

    def times(self, graph: JointGraph) -> dict[str, float]:
        if not self.fuses_pointwise:
            return {node.name: self.node_time_s(node) for node in graph.nodes}
        materialised = _materialised(graph)
        return {node.name: self._fused_time_s(graph, node, materialised) if node.pointwise
                else self.node_time_s(node) for node in graph.nodes}

    def _fused_time_s(self, graph: JointGraph, node: Node, materialised: set[str]) -> float:
        """A pointwise op fused with its neighbours: no launch of its own, and it moves only
        what it reads from memory (values materialised by other kernels) and what it writes
        there."""
        read = {s for name in node.inputs if _base(graph, name) in materialised
                for s in graph[name].storages}
        written = set(graph.allocates[node.name]) if node.name in materialised else set()
        moved = sum(graph.storages[s].nbytes for s in read | written)
        return max(node.flops / self.rates.flop_rate(node), moved / self.rates.bytes_per_s)


def _is_view(node: Node) -> bool:
    return node.op.startswith(_FREE_OPS)


def _base(graph: JointGraph, name: str) -> str:
    while _is_view(graph[name]) and graph[name].inputs:
        name = graph[name].inputs[0]
    return name


def _materialised(graph: JointGraph) -> set[str]:
    """Values in memory when pointwise ops fuse: those of other ops, and a pointwise value that
    an op other than a pointwise one of its own phase reads (through views), or that the step
    returns. A pointwise value the other phase reads is saved or recomputed: written either way."""
    returned = {_base(graph, name) for name in (*graph.forward_outputs, *graph.backward_outputs)}

    def readers(name: str) -> Iterator[Node]:
        for user in graph.users[name]:
            yield from readers(user) if _is_view(graph[user]) else (graph[user],)

    return {node.name for node in graph.nodes if not _is_view(node) and (
        not node.pointwise or node.name in returned
        or any(not r.pointwise or r.phase is not node.phase for r in readers(node.name)))}


EXECUTORS = ("eager", "compiled", "cuda_graphs")


def for_device(device_type: str, device_name: str = "", *,
               executor: str = "eager") -> AnalyticCostModel:
    """The table row for a device: by name for known GPUs, else a generic GPU or the CPU,
    priced for the executor that runs the plan. Only the eager executor makes an op wait for
    the host's dispatch: compiled graphs fuse small ops into few kernels, and CUDA graphs
    (``"cuda_graphs"``: the eager executor's ops, replayed) launch every op at once, each at
    ``replayed_op_s`` more."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}: choose one of {list(EXECUTORS)}")
    name = device_name.lower()
    key = next((k for k in ("h200", "h100") if k in name), "h100" if device_type == "cuda" else "cpu")
    rates = DEVICES[key]
    if executor != "eager":
        rates = replace(rates, dispatch_s=0.0)
    if executor == "cuda_graphs":
        rates = replace(rates, launch_s=rates.launch_s + rates.replayed_op_s)
    return AnalyticCostModel(rates, fuses_pointwise=executor == "compiled")
