"""The IR: the joint forward+backward graph as plain data, free of torch.

Capture turns an ATen joint graph into a :class:`JointGraph`; everything after it (liveness,
programs, solvers, report) reads only this. A node computes one op; its value refers to one or
more *storages* (a view refers to its base's storage, a multi-output op to one storage per
output). Memory is counted per storage, so aliases are never counted twice.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable

import networkx as nx


CUDA_ALLOCATOR_ROUNDING = 512  # every CUDA caching-allocator block is a multiple of 512 bytes
# Views that only reshape a value: its elements keep their order in the storage.
RESHAPES = frozenset({"aten.alias.default", "aten.view.default", "aten._unsafe_view.default",
                      "aten.reshape.default", "aten.unsqueeze.default", "aten.squeeze.dim",
                      "aten.squeeze.dims"})


def allocated_bytes(nbytes: int, rounding: int) -> int:
    """What the allocator hands out for ``nbytes``: rounded up to a multiple of ``rounding``."""
    return -(-nbytes // rounding) * rounding


class Phase(str, enum.Enum):
    PRIMAL = "primal"  # parameters, buffers and user inputs: resident for the whole step
    TANGENT = "tangent"  # incoming gradients of the outputs
    FORWARD = "forward"
    BACKWARD = "backward"


class Category(str, enum.Enum):
    PARAMETER = "parameter"
    BUFFER = "buffer"
    INPUT = "input"
    ACTIVATION = "activation"  # forward values, saved or recomputed for backward
    TEMPORARY = "temporary"  # backward values that are not gradients, tangents
    GRADIENT = "gradient"


@dataclass(frozen=True)
class Storage:
    nbytes: int
    category: Category
    dtype: str = ""  # of the tensor that allocates it: an op writes in place only over its own dtype


@dataclass(frozen=True)
class Node:
    name: str
    phase: Phase
    inputs: tuple[str, ...]  # producers this node reads, in argument order, without repeats
    storages: tuple[int, ...]  # storages its value refers to (aliases included)
    op: str = ""
    module_path: str = ""
    must_save: bool = False  # never recomputed: drawn from the RNG, or a buffer's new value
    mutated: bool = False  # a primal the step writes (BatchNorm running statistics)
    state_inputs: tuple[str, ...] = ()  # mutated primals it reads without their value mattering
    mutates: bool = False  # writes an input in place (copy_ into a buffer): always runs
    is_tensor: bool = True  # False for tuples of outputs and symbolic sizes
    flops: int = 0
    precision: str = ""  # the math its FLOPs run in: "fp32", "tf32", "bf16", "fp16"
    bytes_moved: int = 0  # bytes read plus bytes written, for the roofline
    workspace_bytes: int = 0  # scratch memory held only while the op runs (cuDNN workspaces)
    written_in_place: bool = False  # the model's eager code computes or overwrites it in place
    pointwise: bool = False  # elementwise (torch.Tag.pointwise): cheap to recompute from its inputs
    dense: bool = False  # a tensor that covers its storage exactly: one copy moves it


@dataclass(frozen=True)
class JointGraph:
    """The training step: nodes in the joint graph's topological order."""

    nodes: tuple[Node, ...]
    storages: tuple[Storage, ...]
    forward_outputs: tuple[str, ...]  # mutated buffers' new values first, then the user outputs
    user_output_count: int
    backward_outputs: tuple[str, ...]  # gradients, one per primal that needs one
    ambient_bytes: int = 0  # other memory on the device during the step (cuBLAS workspaces, ...)
    loss_bytes: int = 0  # the loss the caller computes from the outputs, and its gradient seed
    compiled: bool = False  # run as inductor's kernels: the simulator counts their fusions

    @cached_property
    def index(self) -> dict[str, int]:
        return {node.name: i for i, node in enumerate(self.nodes)}

    @cached_property
    def by_name(self) -> dict[str, Node]:
        """``graph[name]`` as a dict, for loops over every node of every candidate program."""
        return {node.name: node for node in self.nodes}

    def __getitem__(self, name: str) -> Node:
        return self.by_name[name]

    @cached_property
    def forward_names(self) -> frozenset[str]:
        return frozenset(node.name for node in self.nodes if node.phase is Phase.FORWARD)

    @cached_property
    def needed_by_outputs(self) -> frozenset[str]:
        """The forward outputs, the forward's in-place writes (buffer updates), and every node
        they read, directly or not: what any forward pass computes, whatever it saves."""
        return self.ancestors([*self.forward_outputs,
                               *(n.name for n in self.nodes_of(Phase.FORWARD) if n.mutates)])

    def ancestors(self, names: Iterable[str], known: frozenset[str] = frozenset()) -> frozenset[str]:
        """``names``, and every node they read, directly or not, together with ``known``: a set
        closed under reading (what a node in it reads is in it), where the walk stops."""
        found = set(known)
        stack = [name for name in names if name not in found]
        while stack:
            name = stack.pop()
            if name in found:
                continue
            found.add(name)
            stack.extend(self.by_name[name].inputs)
        return frozenset(found)

    @cached_property
    def unrecomputable(self) -> frozenset[str]:
        """Values a recomputation would change: those drawn from the RNG or written back to a
        buffer (``Node.must_save``), and those that read a buffer the step mutates, other than
        as a state input."""
        mutated = {node.name for node in self.nodes if node.mutated}
        return frozenset(node.name for node in self.nodes if node.must_save or any(
            i in mutated and i not in node.state_inputs for i in node.inputs))

    @cached_property
    def recomputable_inputs(self) -> dict[str, tuple[str, ...]]:
        """The inputs of each forward value that may be recomputed (not ``unrecomputable``)."""
        return {node.name: node.inputs for node in self.nodes_of(Phase.FORWARD)
                if node.name not in self.unrecomputable}

    @cached_property
    def savable(self) -> frozenset[str]:
        """The values backward may receive from the step: primals and forward values."""
        return self.forward_names | {node.name for node in self.nodes_of(Phase.PRIMAL)}

    @cached_property
    def laid_out_as_allocated(self) -> frozenset[str]:
        """Values whose elements sit in their storage in the order of the dense value that
        allocated it: that value (or a multi-output op's output), and views of it that only
        reshape (no permutation, offset or broadcast). An op reads these at the index it writes
        a value of the same shape at."""
        found: set[str] = set()
        for node in self.nodes:
            own = self.allocates[node.name]
            if len(node.storages) == 1 and node.dense and (
                    own == node.storages or (not own and node.op == "getitem")):
                found.add(node.name)  # one output of its own, or of a multi-output op's
            elif (not own and node.op in RESHAPES and len(node.inputs) == 1
                  and node.inputs[0] in found):
                found.add(node.name)
        return frozenset(found)

    @cached_property
    def read_by_backward(self) -> frozenset[str]:
        """The forward values and primals that the backward nodes computing the gradients read,
        or that are gradients themselves: where every saved set is decided."""
        read: set[str] = set()
        seen: set[str] = set()
        stack = list(self.backward_outputs)
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            node = self.by_name[name]
            if node.phase is Phase.BACKWARD:
                stack.extend(node.inputs)
            elif node.phase is not Phase.TANGENT:
                read.add(name)
        return frozenset(read)

    @cached_property
    def users(self) -> dict[str, tuple[str, ...]]:
        users: dict[str, list[str]] = {node.name: [] for node in self.nodes}
        for node in self.nodes:
            for name in node.inputs:
                users[name].append(node.name)
        return {name: tuple(u) for name, u in users.items()}

    @cached_property
    def allocates(self) -> dict[str, tuple[int, ...]]:
        """Storages each node creates: the first node (in joint order) that refers to them."""
        seen: set[int] = set()
        out: dict[str, tuple[int, ...]] = {}
        for node in self.nodes:
            new = tuple(s for s in node.storages if s not in seen)
            seen.update(new)
            out[node.name] = new
        return out

    def nodes_of(self, phase: Phase) -> tuple[Node, ...]:
        return self._by_phase[phase]

    @cached_property
    def _by_phase(self) -> dict[Phase, tuple[Node, ...]]:
        return {phase: tuple(node for node in self.nodes if node.phase is phase) for phase in Phase}

    @cached_property
    def resident_bytes(self) -> int:
        """Bytes held all step long: parameters, buffers, inputs, and the device's other memory."""
        return self.ambient_bytes + sum(self.storages[s].nbytes for s in self._primal_storages)

    @cached_property
    def _primal_storages(self) -> frozenset[int]:
        return frozenset(s for n in self.nodes_of(Phase.PRIMAL) for s in n.storages)

    def to_networkx(self) -> nx.DiGraph:
        """The op/value graph as networkx, one vertex per node with its attributes."""
        g = nx.DiGraph()
        for node in self.nodes:
            nbytes = sum(self.storages[s].nbytes for s in self.allocates[node.name])
            g.add_node(node.name, phase=node.phase.value, op=node.op, nbytes=nbytes,
                       module_path=node.module_path, flops=node.flops)
            g.add_edges_from((src, node.name) for src in node.inputs)
        return g
