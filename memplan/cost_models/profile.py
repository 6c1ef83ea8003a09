"""Measured op times: each distinct call (op, shapes, strides, dtypes, arguments) of the joint graph
runs on the real device, and its time is the wall-clock time per call of a run of calls.

Wall-clock over back-to-back calls, synchronised at the ends, is what eager recomputation pays:
for a large kernel it is the kernel's time, for a small one the host's dispatch and launch time,
which on a fast GPU dominates (CUDA events alone would see only the kernel). Results are cached
on disk per device and torch version, so a second plan of the same model measures nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

from memplan.cost_models.analytic import allows_tf32
from memplan.cost_models.workspace import call_key, real_argument
from memplan.passes.dropout import sets_generator_state

log = logging.getLogger(__name__)

CALLS = 10  # timed calls per distinct op, after two warm-up calls


def default_cache_path() -> Path:
    root = os.environ.get("MEMPLAN_CACHE_DIR") or Path.home() / ".cache" / "memplan"
    return Path(root) / "op_times.json"


def device_label(device: torch.device) -> str:
    """The device, torch's version and the math modes: TF32 changes what a float32 matrix
    product or convolution costs."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    math = f"matmul TF32 {allows_tf32(convolution=False)}, cuDNN TF32 {allows_tf32(convolution=True)}"
    return f"{name} | torch {torch.__version__} | {math}"


class OpTimeCache:
    """Seconds per call, by device label and call key, in one JSON file."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict[str, float]] = (
            json.loads(path.read_text()) if path.exists() else {})
        self.measured = 0  # calls timed by this instance: zero when the cache had everything

    def get(self, device: torch.device, key: str) -> float | None:
        return self.entries.get(device_label(device), {}).get(key)

    def put(self, device: torch.device, key: str, seconds: float) -> None:
        self.entries.setdefault(device_label(device), {})[key] = seconds
        self.measured += 1

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        temporary.replace(self.path)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(node: fx.Node, device: torch.device) -> float | None:
    """Seconds per call of ``node``'s op on real tensors shaped like its arguments, or None when
    the op does not run on made-up values (it is then priced by the analytic model)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():  # the caller's RNG is untouched
        try:
            args, kwargs = pytree.tree_map_only(
                fx.Node, lambda n: real_argument(n.meta.get("val"), device), (node.args, node.kwargs))
            for _ in range(2):
                node.target(*args, **kwargs)
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(CALLS):
                node.target(*args, **kwargs)
            _synchronize(device)
        except (RuntimeError, IndexError, ValueError) as error:
            log.debug("cannot time %s: %s", node.format_node(), error)
            return None
    return (time.perf_counter() - start) / CALLS


def profile_times(joint: fx.GraphModule, device: torch.device, cache: OpTimeCache) -> dict[str, float]:
    """Measured seconds per node name, views included: in eager their dispatch is not free."""
    times: dict[str, float] = {}
    with _disable_current_modes():  # the planner runs under aot_autograd's FakeTensorMode
        for node in joint.graph.nodes:
            _time_node(node, device, cache, times)
    if cache.measured:
        cache.save()
    return times


# Fused attention backwards read the forward's generator seed and offset from their arguments;
# run on made-up ones, the efficient attention's crashed the process on an H200 (torch 2.11).
# They keep their analytic price.
_NOT_TIMED = ("aten._scaled_dot_product_efficient_attention_backward.",
              "aten._scaled_dot_product_flash_attention_backward.",
              "aten._scaled_dot_product_cudnn_attention_backward.",
              "aten._efficient_attention_backward.", "aten._flash_attention_backward.")


def _time_node(node: fx.Node, device: torch.device, cache: OpTimeCache, times: dict[str, float]) -> None:
    if (node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload)
            or sets_generator_state(node.target) or str(node.target).startswith(_NOT_TIMED)):
        return
    key = call_key(node)
    seconds = cache.get(device, key)
    if seconds is None:
        seconds = time_call(node, device)
        if seconds is None:
            return
        cache.put(device, key, seconds)
    times[node.name] = seconds
