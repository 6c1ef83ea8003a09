"""Offload saved values to host memory and fetch them back, where the program's transfers say.

The forward graph copies each offloaded value to pinned host memory as soon as it is made and
hands backward the host copy. After the transfer's ``free_after`` node the device waits for
that copy, and only then drops the value, so that its memory is reused after the copy has read
it. The backward graph allocates the value anew after step ``fetch_after`` and copies it back;
the first node that reads it waits for that copy.

Copies run on a side stream, ordered by events: the host never waits, unless a step fails
(``wait_for_copies``). Each copy's stream first
waits for the compute stream, so that it reads a finished value and writes memory that compute
no longer uses; memory is allocated and freed on the compute stream only, as the simulator
counts it. Off CUDA the copies are plain copies, which tests use to check the rewrite. On the
compiled path the calls run as they are, between inductor's segments (``HOST_STEPS``).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import NamedTuple

import torch
import torch.fx as fx

from memplan.program import Program

_side_streams: dict[torch.device, torch.cuda.Stream] = {}


class InFlight(NamedTuple):
    tensor: torch.Tensor
    event: torch.cuda.Event | None  # recorded after the copy, on the side stream
    device: torch.device  # whose compute stream waits for it


def _copy(source: torch.Tensor, target: torch.Tensor, device: torch.device) -> InFlight:
    if device.type != "cuda":
        target.copy_(source)
        return InFlight(target, None, device)
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    stream = _side_streams[device]
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        target.copy_(source, non_blocking=True)
    return InFlight(target, stream.record_event(), device)


def to_host(value: torch.Tensor) -> InFlight:
    host = torch.empty_strided(value.size(), value.stride(), dtype=value.dtype, device="cpu",
                               pin_memory=value.is_cuda)
    return _copy(value, host, value.device)


def to_device(host: torch.Tensor, device: torch.device) -> InFlight:
    value = torch.empty_strided(host.size(), host.stride(), dtype=host.dtype, device=device)
    return _copy(host, value, device)


def wait_for_copies() -> None:
    """Block until every copy has finished: a step that raises drops the values being copied
    back, whose memory the side stream may still be writing. Called as such a step unwinds: a
    device that fails here too leaves the step's own error to be reported."""
    for stream in _side_streams.values():
        with contextlib.suppress(RuntimeError):
            stream.synchronize()


def arrived(flight: InFlight, *held: torch.Tensor) -> torch.Tensor:
    """The copy's result, once the compute stream has waited for it; ``held`` stay alive until
    here (the device value an offload reads)."""
    if flight.event is not None:
        torch.cuda.current_stream(flight.device).wait_event(flight.event)
    return flight.tensor


# The calls these passes add: inductor's path runs them as they are, between compiled segments.
HOST_STEPS = frozenset({to_host, to_device, arrived})


def offload_in_forward(forward: fx.GraphModule, program: Program) -> None:
    """Copy each transferred value to the host; the graph returns the host copy instead.
    Where a pass erased a transfer's ``free_after`` node (``reuse_draws_in_forward``), the
    value is dropped after the nearest node before it in the program's order."""
    transfers, order = program.offloaded, program.forward
    if not transfers:
        return
    graph = forward.graph
    nodes = {node.name: node for node in graph.nodes}
    position = {name: i for i, name in enumerate(order)}
    host_copies: dict[fx.Node, fx.Node] = {}
    for transfer in transfers:
        value = nodes[transfer.name]
        with graph.inserting_after(value):
            flight = graph.call_function(to_host, (value,))
        at = position[transfer.free_after]
        while order[at] not in nodes:
            at -= 1
        free_after = flight if order[at] == transfer.name else nodes[order[at]]
        with graph.inserting_after(free_after):
            host_copies[value] = graph.call_function(arrived, (flight, value))
    output = graph.output_node()
    output.args = (tuple(host_copies.get(arg, arg) for arg in output.args[0]),)
    graph.lint()
    forward.recompile()


def fetch_in_backward(backward: fx.GraphModule, program: Program) -> None:
    """Copy each transferred value back after its ``fetch_after`` step, for its first reader,
    to the device it came from (its placeholder's traced value says which). Call it on the graph
    ``memplan.passes.partition`` built: one node per program step."""
    transfers = program.offloaded
    if not transfers:
        return
    graph = backward.graph
    placeholders = {node.name: node for node in graph.find_nodes(op="placeholder")}
    steps = [node for node in graph.nodes if node.op == "call_function"]
    order = {node: i for i, node in enumerate(graph.nodes)}
    by_anchor: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for transfer in transfers:
        host = placeholders[transfer.name]
        anchor = steps[transfer.fetch_after] if transfer.fetch_after >= 0 else list(placeholders.values())[-1]
        by_anchor[anchor].append(host)
    for anchor, hosts in by_anchor.items():
        point = anchor
        for host in sorted(hosts, key=lambda h: min(order[u] for u in h.users)):
            readers = sorted(host.users, key=order.__getitem__)
            with graph.inserting_after(point):
                flight = graph.call_function(to_device, (host, host.meta["val"].device))
            with graph.inserting_before(readers[0]):
                value = graph.call_function(arrived, (flight,))
            value.meta["val"] = _new_like(host.meta["val"])  # what inductor compiles readers for
            for reader in readers:
                reader.replace_input_with(host, value)
            point = flight
    graph.lint()
    backward.recompile()


def _new_like(traced: torch.Tensor) -> torch.Tensor:
    """A traced value of the same layout with a storage of its own."""
    with getattr(traced, "fake_mode", None) or contextlib.nullcontext():
        return torch.empty_strided(traced.size(), traced.stride(), dtype=traced.dtype,
                                   device=traced.device)
