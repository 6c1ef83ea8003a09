"""The memory simulator: live bytes at every step of one training step, and where the peak is.

It replays a :class:`~memplan.program.Program` the way the executor runs it: parameters, buffers
and inputs are resident throughout; the forward graph frees each value after its last use; the
saved values live until their last use in backward (the backward receives them in a list it
clears, so each is freed as soon as backward is done with it); the user's outputs live until the
end of the step; the loss (a scalar and its gradient seed) and the tangents are allocated when
backward starts; gradients are kept. An offloaded value leaves the device after its transfer's
``free_after`` node and is allocated again when its copy back starts.

Memory is counted per storage instance: a view adds nothing, a recomputation allocates anew.

A compiled step (``JointGraph.compiled``) runs as inductor's kernels, which do three things the
graph's order does not show. A pointwise value whose one reader (through views) is a pointwise
op or a reduction is computed inside that reader's kernel: it is never allocated, and what it
reads lives until the reader runs. A pointwise op writes its value over an input that dies
there, of its dtype and size, computed in the same graph and read at the index the op writes
(``decide_inplace_update``; not a transpose made contiguous). And a pointwise op that reads a
value its kernel writes runs in that kernel, which frees the inputs that die in it only once it
has written all its values (``_Kernels.join``). The simulator counts all three, within
inductor's limits on what one kernel inlines, and lists each pair of steps it counted on for
the first two (``Timeline.fused``): ``memplan.inductor`` keeps each pair in one compiled
segment, where inductor sees both. A kernel the third finds may be cut by a segment's end, which
frees its inputs sooner than counted. On GPT-2 medium's least plan on
an H200 the graph order counted 1,344 MiB for an attention backward whose kernels took 960.5
(bench/results/segment_peaks_h200.md).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Sequence, overload

from memplan.graph import RESHAPES, Category, JointGraph, Phase
from memplan.program import Program, Transfer

_Key = tuple[int, int]  # (storage id, instance: step that allocated it, or a negative tag)
_FORWARD, _TANGENT, _RESIDENT, _FETCHED = -1, -2, -3, -4


@dataclass(frozen=True)
class Timeline:
    peak_bytes: int
    peak_step: int  # index into ``steps``
    program: Program  # what was simulated: one step per node of its forward, then its backward
    live_bytes: tuple[int, ...]  # at each step, while the node's output is being written
    peak_breakdown: dict[str, int] = field(default_factory=dict)  # category -> bytes at the peak
    # Compiled steps: (step, later step) pairs counted as one kernel's, which must share a segment
    fused: tuple[tuple[int, int], ...] = ()

    @property
    def steps(self) -> tuple[str, ...]:
        """"forward:<node>" / "backward:<node>", in execution order."""
        return (tuple(f"forward:{name}" for name in self.program.forward)
                + tuple(f"backward:{name}" for name in self.program.backward))

    @property
    def peak_node(self) -> str:
        forward = self.program.forward
        if self.peak_step < len(forward):
            return f"forward:{forward[self.peak_step]}"
        return f"backward:{self.program.backward[self.peak_step - len(forward)]}"


class _Ledger:
    """Reference-counted storage instances, with live bytes in total and per category."""

    def __init__(self, graph: JointGraph):
        self.graph = graph
        self.holders: dict[_Key, int] = {}
        self.overwritten: set[_Key] = set()  # freed as an op writes over them, still referred to
        self.live = 0
        self.by_category = {c: 0 for c in Category}
        for s in sorted(graph._primal_storages):
            self.by_category[graph.storages[s].category] += graph.storages[s].nbytes
        self.resident = graph.resident_bytes

    def allocate(self, key: _Key) -> None:
        storage = self.graph.storages[key[0]]
        self.holders[key] = 0
        self.live += storage.nbytes
        self.by_category[storage.category] += storage.nbytes

    def hold(self, keys: tuple[_Key, ...]) -> None:
        for key in keys:
            if key[1] != _RESIDENT:
                self.holders[key] += 1

    def release(self, keys: tuple[_Key, ...]) -> None:
        for key in keys:
            if key[1] == _RESIDENT:
                continue
            self.holders[key] -= 1
            if self.holders[key] == 0:
                del self.holders[key]
                if key in self.overwritten:
                    self.overwritten.discard(key)
                else:
                    self._free(key)

    def overwrite(self, key: _Key) -> None:
        """An op writes its value over ``key``'s storage: its bytes are the new value's."""
        self.overwritten.add(key)
        self._free(key)

    def _free(self, key: _Key) -> None:
        storage = self.graph.storages[key[0]]
        self.live -= storage.nbytes
        self.by_category[storage.category] -= storage.nbytes

    @property
    def total(self) -> int:
        return self.resident + self.live


def _keys(graph: JointGraph, name: str, instance: int, input_keys: list[tuple[_Key, ...]]) -> tuple[_Key, ...]:
    """Storage instances a node's value refers to: its own new ones, else those of its inputs."""
    storages = graph.by_name[name].storages
    own = graph.allocates[name]
    if own == storages:  # a value of its own storages (most nodes): no input's to look up
        return tuple((s, instance) for s in storages)
    own = set(own)
    inherited = {key[0]: key for keys in input_keys for key in keys}
    out = []
    for s in storages:
        if s in own:
            out.append((s, instance))
        else:
            out.append(inherited.get(s, (s, _FORWARD)))
    return tuple(out)


def forward_end_bytes(graph: JointGraph, saved: Iterable[str],
                      offloaded: Iterable[Transfer] = ()) -> int:
    """A lower bound of the peak of every program that saves ``saved`` (``offloaded`` on the
    host), without a simulation: the bytes live as the forward ends, when every saved value
    and forward output is held."""
    resident = graph._primal_storages
    offloaded = {t.name for t in offloaded}
    held = {s for name in (*saved, *graph.forward_outputs) if name not in offloaded
            for s in graph[name].storages if s not in resident}
    return graph.resident_bytes + sum(graph.storages[s].nbytes for s in held)


class _OverLimit(Exception):
    pass


@overload
def simulate(graph: JointGraph, program: Program) -> Timeline: ...


@overload
def simulate(graph: JointGraph, program: Program, *, limit_bytes: int) -> Timeline | None: ...


def simulate(graph: JointGraph, program: Program, *, limit_bytes: int | None = None) -> Timeline | None:
    """The program's timeline; with ``limit_bytes``, None as soon as a step goes above it, which
    spares simulating the rest of a program that cannot fit."""
    try:
        return _simulate(graph, program, limit_bytes)
    except _OverLimit:
        return None


def _simulate(graph: JointGraph, program: Program, limit_bytes: int | None) -> Timeline:
    ledger = _Ledger(graph)
    nodes = graph.by_name
    live: list[int] = []
    best = (-1, 0, {})

    def record(workspace_bytes: int) -> None:
        nonlocal best
        total = ledger.total + workspace_bytes
        live.append(total)
        if limit_bytes is not None and total > limit_bytes:
            raise _OverLimit
        if total > best[0]:
            breakdown = {c.value: b for c, b in ledger.by_category.items() if b}
            for name, nbytes in (("workspace", workspace_bytes), ("other", graph.ambient_bytes)):
                if nbytes:
                    breakdown[name] = nbytes
            best = (total, len(live) - 1, breakdown)

    resident_keys = {}
    for node in graph.nodes_of(Phase.PRIMAL):
        resident_keys[node.name] = tuple((s, _RESIDENT) for s in node.storages)

    # Forward: one instance per node, freed after its last forward use unless handed on.
    fw_keys: dict[str, tuple[_Key, ...]] = {}
    position = {name: i for i, name in enumerate(program.forward)}
    last_use = dict(position)
    for name in program.forward:
        for src in nodes[name].inputs:
            if src in position:
                last_use[src] = max(last_use[src], position[name])
    for transfer in program.offloaded:
        last_use[transfer.name] = max(last_use[transfer.name], position[transfer.free_after])
    offloaded = {t.name for t in program.offloaded}
    handed_on = set(graph.forward_outputs) | set(program.saved) - offloaded
    dying: dict[int, list[str]] = {}
    for name, step in last_use.items():
        if name not in handed_on:
            dying.setdefault(step, []).append(name)
    fused: list[tuple[int, int]] = []  # compiled: pairs of steps counted as one kernel's
    copies = {position[t.name] for t in program.offloaded} | {
        position[t.free_after] for t in program.offloaded}
    kernels = _Kernels(graph, program.forward, copies, fused)
    if graph.compiled:
        readers: dict[int, list[int]] = {}
        for i, name in enumerate(program.forward):
            for src in nodes[name].inputs:
                if src in position:
                    readers.setdefault(position[src], []).append(i)
        kernels.inline(lambda i: [position.get(src, src) for src in nodes[program.forward[i]].inputs],
                       lambda i: readers.get(i, ()), lambda i: program.forward[i] in handed_on)
        kernels.join()
    made_at: dict[int, int] = {}  # storage -> forward step that allocated it
    freed: list[tuple[_Key, ...]] = []  # by the steps of the kernel that runs last
    for i, name in enumerate(program.forward):
        if i not in kernels.joined:  # the kernel before has run
            _release_all(ledger, freed)
        inputs = [fw_keys.get(src) or resident_keys.get(src, ()) for src in nodes[name].inputs]
        if i in kernels.carried:
            keys = _read_keys(inputs)
        else:
            for s in graph.allocates[name]:
                ledger.allocate((s, _FORWARD))
                made_at[s] = i
            keys = _keys(graph, name, _FORWARD, inputs)
            kernels.write_over(ledger, i, lambda k: fw_keys[program.forward[k]],
                               [fw_keys[dead] for dead in dying.get(i, ()) if dead != name],
                               lambda key: made_at.get(key[0]) if key[1] == _FORWARD else None)
        ledger.hold(keys)
        fw_keys[name] = keys
        record(nodes[name].workspace_bytes)
        freed.extend(fw_keys[dead] for dead in dying.get(i, ()))
    _release_all(ledger, freed)
    # Backward: placeholders are the saved values and the tangents; a name may be recomputed
    # more than once, and every use reads its latest instance.
    placeholder_keys = {name: fw_keys.get(name) or resident_keys[name] for name in program.saved}
    for name in offloaded:  # a new device copy, allocated when it is fetched
        placeholder_keys[name] = tuple((s, _FETCHED) for s in nodes[name].storages)
    fetches: dict[int, list[str]] = {}
    for transfer in program.offloaded:
        fetches.setdefault(transfer.fetch_after + 1, []).append(transfer.name)
    for name in program.saved:  # the backward's input list takes a reference
        if name not in offloaded:
            ledger.hold(placeholder_keys[name])
    mutations = graph.forward_outputs[:len(graph.forward_outputs) - graph.user_output_count]
    for name in mutations:  # the runtime copies them into the buffers, then drops them
        ledger.release(fw_keys.get(name, ()))
    for name in program.saved:  # the forward's own reference ends with the forward
        if name in fw_keys and name not in graph.forward_outputs and name not in offloaded:
            ledger.release(fw_keys[name])
    ledger.live += graph.loss_bytes
    ledger.by_category[Category.TEMPORARY] += graph.loss_bytes
    for node in graph.nodes_of(Phase.TANGENT):
        for s in node.storages:
            ledger.allocate((s, _TANGENT))
        placeholder_keys[node.name] = tuple((s, _TANGENT) for s in node.storages)
        ledger.hold(placeholder_keys[node.name])

    binding: list[list[tuple[str, int]]] = []  # per step: (input name, instance step or -1)
    latest: dict[str, int] = {}
    for j, name in enumerate(program.backward):
        binding.append([(src, latest.get(src, -1)) for src in nodes[name].inputs])
        latest[name] = j
    last_bind: dict[tuple[str, int], int] = {}
    for j, inputs in enumerate(binding):
        for ref in inputs:
            last_bind[ref] = j
    keep_to_end = {(name, latest[name]) for name in graph.backward_outputs if name in latest}
    bw_dying: dict[int, list[tuple[str, int]]] = {}
    for j, name in enumerate(program.backward):
        if (name, j) not in keep_to_end:
            bw_dying.setdefault(last_bind.get((name, j), j), []).append((name, j))
    for ref, j in last_bind.items():
        if ref[1] == -1 and ref[0] in placeholder_keys and ref[0] not in resident_keys:
            bw_dying.setdefault(j, []).append(ref)

    first_read: dict[str, int] = {}
    for j, refs in enumerate(binding):
        for src, instance in refs:
            if instance < 0:
                first_read.setdefault(src, j)
    copies = {t.fetch_after for t in program.offloaded} | {
        first_read[t.name] - 1 for t in program.offloaded if t.name in first_read}
    kernels = _Kernels(graph, program.backward, copies, fused, offset=len(program.forward))
    if graph.compiled:
        bw_readers: dict[int, list[int]] = {}
        for j, refs in enumerate(binding):
            for _, instance in refs:
                if instance >= 0:
                    bw_readers.setdefault(instance, []).append(j)
        kernels.inline(lambda j: [ref[1] if ref[1] >= 0 else ref[0] for ref in binding[j]],
                       lambda j: bw_readers.get(j, ()),
                       lambda j: (program.backward[j], j) in keep_to_end)
        kernels.join()
    bw_keys: dict[tuple[str, int], tuple[_Key, ...]] = {}
    for j, name in enumerate(program.backward):
        if j not in kernels.joined:
            _release_all(ledger, freed)
        for fetched in fetches.get(j, ()):
            for key in placeholder_keys[fetched]:
                ledger.allocate(key)
            ledger.hold(placeholder_keys[fetched])
        inputs = [bw_keys[ref] if ref[1] >= 0 else placeholder_keys.get(ref[0]) or
                  resident_keys.get(ref[0], ()) for ref in binding[j]]
        if j in kernels.carried:
            keys = _read_keys(inputs)
        else:
            for s in graph.allocates[name]:
                ledger.allocate((s, j))
            keys = _keys(graph, name, j, inputs)
            kernels.write_over(ledger, j, lambda k: bw_keys[(program.backward[k], k)],
                               [bw_keys[ref] if ref[1] >= 0 else placeholder_keys[ref[0]]
                                for ref in bw_dying.get(j, ()) if ref != (name, j)],
                               lambda key: key[1] if key[1] >= 0 else None)
        ledger.hold(keys)
        bw_keys[(name, j)] = keys
        record(nodes[name].workspace_bytes)
        freed.extend(bw_keys[ref] if ref[1] >= 0 else placeholder_keys[ref[0]]
                     for ref in bw_dying.get(j, ()))
    _release_all(ledger, freed)

    peak, step, breakdown = best if best[0] >= 0 else (ledger.total, 0, {})
    return Timeline(peak_bytes=peak, peak_step=step, program=program, live_bytes=tuple(live),
                    peak_breakdown=breakdown, fused=tuple(fused))


# What inductor computes inside a reader's kernel (``torch._inductor.config``): a pointwise value
# that reads more than 8 buffers (``realize_acc_reads_threshold`` on CUDA) or whose loop body
# exceeds 30 operations (``realize_opcount_threshold``) is written out. memplan counts a value as
# computed in its reader's kernel within 8 buffers and 8 ATen ops: fewer than 4 loop operations
# per ATen op would keep within inductor's 30.
INLINED_READS = 8
INLINED_OPS = 8
# Steps between a value and the kernel counted on to inline it or write over it: each such pair
# holds its segment open (``memplan.inductor``), so a distant one, as a tied weight's gradient
# added at the end of backward, would keep inductor from being cut into segments.
FUSED_SPAN = 16
# Steps of one kernel at most (inductor's ``max_fusion_size``: 64 nodes).
MAX_FUSED_STEPS = 64
REDUCTIONS = frozenset({"aten.sum.dim_IntList", "aten.sum.default", "aten.mean.dim",
                        "aten.amax.default", "aten.amin.default", "aten.var_mean.correction"})
VIEWS = RESHAPES | {"aten.permute.default", "aten.t.default", "aten.transpose.int",
                    "aten.expand.default"}


class _Kernels:
    """One graph's steps as inductor's kernels run them (``JointGraph.compiled``).

    ``carried``: the steps computed inside a later kernel (inlined values and their views);
    pairs of steps counted as one kernel's go to ``fused``, numbered from ``offset``. No pair
    spans one of ``copies`` (a step after which an offload copy runs between segments)."""

    def __init__(self, graph: JointGraph, names: Sequence[str], copies: Iterable[int],
                 fused: list[tuple[int, int]], offset: int = 0):
        self.graph, self.names, self.copies = graph, names, sorted(copies)
        self.fused, self.offset = fused, offset
        self.reads: dict[int, tuple[frozenset[int], frozenset[int]]] = {}  # carried: ``_reads``
        self.sources: Callable[[int], list[int | str]] = lambda step: []
        self.joined: set[int] = set()  # steps run in the kernel of the step before them

    @property
    def carried(self) -> Collection[int]:
        return self.reads.keys()

    def _spans_copy(self, first: int, last: int) -> bool:
        return any(first <= step < last for step in self.copies)

    def inline(self, sources: Callable[[int], list[int | str]],
               readers: Callable[[int], Iterable[int]], handed_on: Callable[[int], bool]) -> None:
        """Find the pointwise values inductor computes inside their one reader's kernel.

        ``sources``: what a step reads (a step of this graph, or the name of an input);
        ``readers``: the steps that read a step; ``handed_on``: whether a step's value leaves
        the graph."""
        nodes, allocates = self.graph.by_name, self.graph.allocates
        self.sources = sources
        work: dict[int, tuple[frozenset[int | str], int]] = {}  # carried: (buffers read, ops)
        for k, name in enumerate(self.names):
            node, reads, ops = nodes[name], set(), 1
            for source in sources(k):
                if source in work:
                    reads |= work[source][0]
                    ops += work[source][1]
                else:
                    reads.add(source)
            if node.op in VIEWS and not allocates[name]:
                carried = [source for source in sources(k) if source in work]
                if carried and not handed_on(k):
                    work[k] = work[carried[0]]
                    straight, other = self._reads(k)
                    self.reads[k] = (straight, other) if node.op in RESHAPES else (
                        frozenset(), straight | other)
                continue
            if (not node.pointwise or len(allocates[name]) != 1 or handed_on(k)
                    or len(reads) > INLINED_READS or ops > INLINED_OPS):
                continue
            reader = self._only_reader(k, readers, handed_on)
            if reader is None or reader - k > FUSED_SPAN or self._spans_copy(k, reader):
                continue
            consumer = nodes[self.names[reader]]
            if consumer.pointwise or consumer.op in REDUCTIONS:
                work[k] = frozenset(reads), ops
                self.reads[k] = self._reads(k)
                self.fused.append((self.offset + k, self.offset + reader))

    def join(self) -> None:
        """Find the pointwise ops inductor runs in the kernel of the step before them (carried
        steps aside): those that read, directly, through views or through values computed in
        their kernel, a value that kernel writes, of the same size and dtype. Such a kernel writes all its
        values before the inputs that die in it are freed: a chain of residual additions
        recomputed in ResNet-164's backward (``pointwise`` at 50%, H200) wrote 18 sums of 4 MiB
        in one kernel, none over its inputs, 67 MiB above the graph's order."""
        nodes, allocates, storages = self.graph.by_name, self.graph.allocates, self.graph.storages
        kernel: list[int] = []  # allocating steps of the kernel so far
        carried: list[int] = []  # since its last one: inside it if another joins
        viewed: dict[int, int] = {}  # a view of a value the kernel writes -> that step

        def written(step: int):
            own = allocates[self.names[step]]
            return (storages[own[0]].nbytes, storages[own[0]].dtype) if len(own) == 1 else None

        for k, name in enumerate(self.names):
            if k in self.carried:
                carried.append(k)
                continue
            if nodes[name].op in VIEWS and not allocates[name]:
                source = next((viewed.get(s, s) for s in self.sources(k)
                               if viewed.get(s, s) in kernel), None)
                if source is not None:
                    viewed[k] = source
                    carried.append(k)
                    continue
            fusible = nodes[name].pointwise and written(k) is not None
            if (fusible and kernel and len(kernel) < MAX_FUSED_STEPS
                    and not self._spans_copy(kernel[0], k)
                    and any(written(viewed.get(step, step)) == written(k)
                            for step in set().union(*self._reads(k))
                            if viewed.get(step, step) in kernel)):
                self.joined.update(carried)
                self.joined.add(k)
                kernel.append(k)
            else:
                kernel = [k] if fusible else []
            carried = []

    def _reads(self, k: int) -> tuple[frozenset[int], frozenset[int]]:
        """The steps of this graph whose values step ``k``'s kernel reads, directly or through
        values computed in the same kernel: those it reads at the index it writes (laid out as
        allocated, reshaped at most), and the others (transposed, sliced, broadcast)."""
        straight: set[int] = set()
        other: set[int] = set()
        for source in self.sources(k):
            if source in self.reads:
                straight |= self.reads[source][0]
                other |= self.reads[source][1]
            elif isinstance(source, int):
                laid_out = self.names[source] in self.graph.laid_out_as_allocated
                (straight if laid_out else other).add(source)
        return frozenset(straight), frozenset(other)

    def _only_reader(self, k: int, readers: Callable[[int], Iterable[int]],
                     handed_on: Callable[[int], bool]) -> int | None:
        """The one step that reads ``k``'s value, through a line of views each read once; None
        if there are more, or if a view of it leaves the graph. (A value read twice is written
        out where it reads many buffers, ``realize_reads_threshold``.)"""
        step = k
        while True:
            following = list(readers(step))
            if len(following) != 1:
                return None
            step = following[0]
            name = self.names[step]
            if not (self.graph[name].op in VIEWS and not self.graph.allocates[name]):
                return step
            if handed_on(step):
                return None

    def write_over(self, ledger: _Ledger, step: int, keys_of: Callable[[int], tuple[_Key, ...]],
                   dying: list[tuple[_Key, ...]], made_at: Callable[[_Key], int | None]) -> None:
        """Where ``step`` is a pointwise op whose value inductor writes over an input that dies
        there, give that input's bytes to the new value. ``keys_of``: a step's keys;
        ``dying``: the keys of the values whose last reader is ``step``; ``made_at``: the step
        of this graph that allocated a key's storage, or None (an input of the graph: inductor
        does not write over those).

        Inductor writes over an input only where the kernel reads it at the index it writes
        (``SchedulerNode.can_inplace``), and reads it there only: here, a value laid out as
        allocated, read directly or through values computed in the kernel and in no other way
        (``_reads``; a transpose read to make a contiguous copy is not), of the same allocated
        bytes, at least
        ``_SIZE_FOR_EXACT_MATCH`` of them, so that rounding to the allocator's blocks cannot
        hide inductor's 5% tolerance."""
        if not self.graph.compiled:
            return
        name = self.names[step]
        own = self.graph.allocates[name]
        if not self.graph[name].pointwise or len(own) != 1:
            return
        out = self.graph.storages[own[0]]
        releases = collections.Counter(key for keys in dying for key in keys)
        straight, other = self._reads(step)
        read_otherwise = {key for source in other for key in keys_of(source)}
        candidates = []
        for source in straight:
            keys = keys_of(source)
            if len(keys) != 1:
                continue
            key = keys[0]
            made = made_at(key)
            storage = self.graph.storages[key[0]]
            if (made is not None and key[0] in self.graph[self.names[source]].storages
                    and key not in read_otherwise
                    and step - made <= FUSED_SPAN and ledger.holders.get(key) == releases[key]
                    and key not in ledger.overwritten and storage.dtype == out.dtype
                    and storage.nbytes == out.nbytes >= _SIZE_FOR_EXACT_MATCH
                    and not self._spans_copy(made, step)):
                candidates.append((made, key))
        if candidates:
            made, key = min(candidates)
            ledger.overwrite(key)
            self.fused.append((self.offset + made, self.offset + step))


# Allocated bytes are rounded to the CUDA allocator's 512-byte blocks; past 20 blocks, equal
# rounded sizes are within the 5% inductor allows between a value and the buffer it reuses.
_SIZE_FOR_EXACT_MATCH = 20 * 512


def _release_all(ledger: _Ledger, freed: list[tuple[_Key, ...]]) -> None:
    for keys in freed:
        ledger.release(keys)
    freed.clear()


def _read_keys(inputs: list[tuple[_Key, ...]]) -> tuple[_Key, ...]:
    """A value computed inside a later kernel holds what it reads until that kernel runs."""
    return tuple(dict.fromkeys(key for keys in inputs for key in keys if key[1] != _RESIDENT))
