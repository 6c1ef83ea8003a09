"""A roofline: time = max(dispatch, launch + max(FLOPs / rate, bytes moved / bandwidth)).

On a fast GPU small kernels are launch-bound, so eager recomputation of many small ops costs far
more than their FLOPs say; the launch term carries that. Beyond it, the host dispatches each op
(Python, the dispatcher, the launch call) while the device runs earlier ones: an op shorter than
its dispatch costs the dispatch. Rates are measured, not datasheet: H100 and H200 rows come from
copies and matrix products timed on those machines.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from memplan.graph import JointGraph, Node


@dataclass(frozen=True)
class DeviceRates:
    fp32_flops_per_s: float
    bytes_per_s: float
    launch_s: float
    dispatch_s: float = 0.0
    host_link_bytes_per_s: float = 0.0  # pinned host memory, each way; 0: nothing to offload to
    replayed_op_s: float = 0.0  # per ATen op replayed in a CUDA graph, beyond launch and roofline


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
DEVICES = {
    "h100": DeviceRates(fp32_flops_per_s=50e12, bytes_per_s=3.0e12, launch_s=5e-6, dispatch_s=40e-6,
                        host_link_bytes_per_s=55e9, replayed_op_s=5.5e-6),
    "h200": DeviceRates(fp32_flops_per_s=50e12, bytes_per_s=4.3e12, launch_s=5e-6, dispatch_s=40e-6,
                        host_link_bytes_per_s=55e9, replayed_op_s=5.5e-6),
    "cpu": DeviceRates(fp32_flops_per_s=100e9, bytes_per_s=20e9, launch_s=2e-6),
}

_FREE_OPS = ("getitem", "aten.t.", "aten.view.", "aten.detach.", "aten.expand.",
             "aten.permute.", "aten.unsqueeze.", "aten.squeeze.", "aten.alias.",
             "aten._unsafe_view.", "aten.slice.", "aten.select.", "aten.transpose.")


@dataclass(frozen=True)
class AnalyticCostModel:
    rates: DeviceRates = DEVICES["cpu"]

    def node_time_s(self, node: Node) -> float:
        if not node.op or node.op.startswith(_FREE_OPS):
            return 0.0
        device_s = self.rates.launch_s + max(node.flops / self.rates.fp32_flops_per_s,
                                             node.bytes_moved / self.rates.bytes_per_s)
        return max(self.rates.dispatch_s, device_s)

    def times(self, graph: JointGraph) -> dict[str, float]:
        return {node.name: self.node_time_s(node) for node in graph.nodes}


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
    return AnalyticCostModel(rates)
