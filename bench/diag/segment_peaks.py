"""Which compiled segments set a planned step's peak, and by how much each departs from its graph
order: per segment of memplan's compiled forward and backward, the bytes it adds above what was
live when it began, measured (``max_memory_allocated``) against the segment's fx graph run in
its own order (each value allocated when computed, freed after its last reader there). A
second table puts each segment's start and peak against its whole graph run in its order and
against the plan's own simulation at the same nodes: whether the step departs from the plan
within segments, across them, or before the first op.

    python bench/diag/segment_peaks.py MODEL BUDGET [--ops N] [--dump DIR] [--inductor-order]
                                       [--layout-optimization] [--no-tf32] [--probe K]
                                       [--probe-under] [--channels-last] [--method M]

MODEL is one of bench/gpu.py's; BUDGET as ``memplan.optimize`` takes it, or ``minimum``.
Each segment's returned value that inductor gives other strides than the planned graph's is
printed as it compiles (``stride change``). ``--dump`` writes, for the three segments that
exceed their graph order most, the three furthest under it and the probed ones, the fx graph with
each value's shape and bytes and the code inductor generated for it, and every segment's row of
the second table as ``segments.json``. ``--inductor-order`` leaves
to inductor where it computes the values whose computation frees storage (see
``memplan.inductor._values_that_free_storage``); ``--layout-optimization`` leaves inductor's
layout optimisation on (``memplan.inductor.CUDA_OPTIONS``); ``--no-tf32`` runs convolutions and
matmuls in full fp32, for planning and step alike. ``--probe K`` runs one more step in which the K
backward segments furthest above the plan's simulation also run their fx graph op by op, eagerly,
on copies of their inputs: each op's scratch memory (its peak beyond its output) against the
workspace the plan measured for it, with its tensor arguments' strides and offsets;
``--probe-under`` probes those furthest under it instead.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import threading
from pathlib import Path

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._guards import TracingContext
from torch.multiprocessing.reductions import StorageWeakRef

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402
import gpu  # noqa: E402

import memplan  # noqa: E402
import memplan.inductor as inductor  # noqa: E402
from memplan.cost_models.workspace import call_workspace, real_argument  # noqa: E402
from memplan.liveness import simulate  # noqa: E402

MiB = 2**20
records: list[dict] = []  # one per segment run, in run order
# The segment last compiled, its code, and the names of its calls before inductor rewrote it.
_compiled: list[tuple[fx.GraphModule, str, list[str]]] = []
_graph_segments: list["RecordedSegment"] = []  # those of the graph being compiled


def graph_order_timeline(graph: fx.GraphModule, freed_inputs: list[bool]
                         ) -> tuple[list[fx.Node], list[int], list[int]]:
    """Run ``graph`` node by node in its order: per node, the bytes live relative to the start
    once its output is allocated, and once what it read last is freed; an input flagged in
    ``freed_inputs`` is freed after its last reader, as the segments do."""
    nodes = list(graph.graph.nodes)
    storage_nodes: dict[object, list[fx.Node]] = collections.defaultdict(list)
    storage_bytes: dict[object, int] = {}
    key_of: dict[fx.Node, object] = {}
    for node in nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            key = StorageWeakRef(val.untyped_storage())
            key_of[node] = key
            storage_nodes[key].append(node)
            storage_bytes[key] = val.untyped_storage().nbytes()
    position = {node: i for i, node in enumerate(nodes)}
    kept = set(graph.graph.output_node().all_input_nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    kept |= {n for n, freed in zip(placeholders, freed_inputs) if not freed}
    last_use: dict[object, int] = {}
    for key, holders in storage_nodes.items():
        if any(h in kept for h in holders):
            continue
        last_use[key] = max(position[u] for h in holders for u in (h, *h.users))
    live, present, at, after = 0, set(), [], []
    for node in nodes:
        key = key_of.get(node)
        if node.op != "placeholder" and key is not None and key not in present:
            live += storage_bytes[key]
        if key is not None:
            present.add(key)
        at.append(live)
        for dead in [k for k in present if last_use.get(k) == position[node]]:
            live -= storage_bytes[dead]
            present.discard(dead)
        after.append(live)
    return nodes, at, after


def graph_order_bytes(graph: fx.GraphModule, freed_inputs: list[bool]) -> tuple[int, int]:
    """Peak and end bytes, relative to the start, of ``graph_order_timeline``."""
    _nodes, at, after = graph_order_timeline(graph, freed_inputs)
    return max(at, default=0), after[-1] if after else 0


def whole_graph_order(graph: fx.GraphModule, segments: list[list[str]]) -> list[tuple[int, int]]:
    """Per segment, the bytes live when it begins and its peak, relative to the start of the
    whole graph run in its order: the plan's prediction of that graph. A backward graph frees
    its inputs (saved values, tangents) after their last reader; a forward graph holds them."""
    placeholders = list(graph.graph.find_nodes(op="placeholder"))
    nodes, at, after = graph_order_timeline(graph, [is_backward(graph)] * len(placeholders))
    position = {node.name: i for i, node in enumerate(nodes)}
    result = []
    for segment in segments:
        members = [position[name] for name in segment]
        first, last = min(members), max(members)
        result.append((after[first - 1], max(at[first:last + 1])))
    return result


def is_backward(graph: fx.GraphModule) -> bool:
    return any(n.name.startswith("tangents") for n in graph.graph.find_nodes(op="placeholder"))


@dataclasses.dataclass
class RecordedSegment(inductor._Segment):
    def __post_init__(self):
        graph, source, self.names = _compiled.pop()
        planned_peak, planned_end = graph_order_bytes(graph, self.last_reads)
        ops = collections.Counter(str(n.target).removeprefix("aten.").split(".")[0]
                                  for n in graph.graph.nodes if n.op == "call_function")
        run = self.run
        self.graph, self.whole = graph, None  # whole: set once its graph is compiled
        self.probe, self.probe_rows = False, []
        _graph_segments.append(self)

        def measured(args: list) -> list:
            copies = copy_arguments(args) if self.probe else None
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = run(args)
            records.append(dict(before=before, peak=torch.cuda.max_memory_allocated() - before,
                                end=torch.cuda.memory_allocated() - before,
                                planned_peak=planned_peak, planned_end=planned_end,
                                ops=ops.most_common(4), graph=graph, source=source,
                                whole=self.whole, names=self.names, segment=self))
            if copies is not None:
                self.probe_rows = op_scratch(graph, copies)
            return out

        self.run = measured


def report_stride_changes(traced: list[tuple], strides: list) -> None:
    """Print a segment's returned values (name, op, traced value) whose compiled strides differ
    from their traced ones, and pass the strides on to ``compile_in_segments``, which reads
    them from the context."""
    for (name, op, val), stride in zip(traced, strides):
        if isinstance(val, torch.Tensor) and stride is not None and tuple(stride) != val.stride():
            print(f"stride change: {name} = {op} {tuple(val.shape)} {val.stride()} -> {tuple(stride)}")
    context = TracingContext.try_get()
    if context is not None and context.output_strides is not None:
        context.output_strides.extend(strides)


def copy_arguments(args: list) -> list:
    """Copies of a segment's arguments with their strides and offsets; arguments sharing a
    storage share the copy."""
    storages: dict[int, torch.Tensor] = {}
    copies = []
    for a in args:
        if not isinstance(a, torch.Tensor):
            copies.append(a)
            continue
        storage = a.untyped_storage()
        if storage.data_ptr() not in storages:
            flat = torch.empty(storage.nbytes(), dtype=torch.uint8, device=a.device)
            flat.copy_(torch.empty(0, dtype=torch.uint8, device=a.device).set_(storage))
            storages[storage.data_ptr()] = flat
        base = storages[storage.data_ptr()].view(a.dtype)
        copies.append(base.as_strided(a.shape, a.stride(), a.storage_offset()))
    return copies


def op_scratch(graph: fx.GraphModule, inputs: list) -> list[dict]:
    """Run ``graph`` eagerly op by op; per op, the bytes it reached beyond what was allocated
    once it returned (scratch), and its tensor arguments' layout."""
    rows = []

    class Probe(fx.Interpreter):
        def run_node(self, node):
            if node.op != "call_function":
                return super().run_node(node)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            result = super().run_node(node)
            torch.cuda.synchronize()
            scratch = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
            layouts = [(tuple(a.shape), a.stride(), a.storage_offset(), a.data_ptr() % 256)
                       for a in self.fetch_args_kwargs_from_env(node)[0]
                       if isinstance(a, torch.Tensor)]
            row = dict(name=node.name, op=str(node.target), scratch=scratch, layouts=layouts)
            if scratch > MiB:  # the plan's measurement of this call, here and on a new thread
                args, kwargs = pytree.tree_map(lambda v: real_argument(v, v.device)
                                               if isinstance(v, torch.Tensor) else v,
                                               self.fetch_args_kwargs_from_env(node))
                device = torch.device("cuda")
                row["here"] = call_workspace(node.target, args, kwargs, device)
                thread = threading.Thread(target=lambda: row.update(
                    new_thread=call_workspace(node.target, args, kwargs, device)))
                thread.start()
                thread.join()
            rows.append(row)
            return result

    Probe(graph).run(*inputs)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=gpu.MODELS)
    parser.add_argument("budget")
    parser.add_argument("--ops", type=int)
    parser.add_argument("--method", default="auto", help="memplan.optimize's")
    parser.add_argument("--dump", type=Path)
    parser.add_argument("--inductor-order", action="store_true")
    parser.add_argument("--layout-optimization", action="store_true")
    parser.add_argument("--no-tf32", action="store_true")
    parser.add_argument("--probe", type=int, default=0)
    parser.add_argument("--probe-under", action="store_true",
                        help="probe the segments furthest under the plan's simulation instead")
    parser.add_argument("--channels-last", action="store_true",
                        help="the model and its input in channels-last memory format")
    args = parser.parse_args()
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if args.ops:
        inductor.OPS_PER_SEGMENT = args.ops
    torch._inductor.config.force_disable_caches = True  # a cached graph compiles no segments
    inductor._Segment = RecordedSegment
    inductor.REUSE_IDENTICAL_SEGMENTS = False  # each segment's own code is recorded
    if args.inductor_order:
        inductor._values_that_free_storage = lambda graph: {}
    if args.layout_optimization:
        inductor.CUDA_OPTIONS = {}
    compile_in_segments = inductor.compile_in_segments
    compiled_graphs: list[fx.GraphModule] = []

    def recording(graph, inputs, compile_graph, ops_per_segment, **options):
        def compile_segment(segment, examples):
            names = [n.name for n in segment.graph.nodes if n.op == "call_function"]
            traced = [(v.name, v.target, v.meta.get("val")) for v in segment.graph.output_node().args[0]]
            with TracingContext.report_output_strides() as strides:
                compiled = compile_graph(segment, examples)
            report_stride_changes(traced, strides or [])
            _compiled.append((segment, getattr(compiled, "source_code", ""), names))
            return compiled
        _graph_segments.clear()
        run = compile_in_segments(graph, inputs, compile_segment, ops_per_segment, **options)
        graph_index = len(compiled_graphs)
        compiled_graphs.append(graph)
        for segment, (start, peak) in zip(_graph_segments,
                                          whole_graph_order(graph, [s.names for s in _graph_segments])):
            segment.whole = (graph_index, start, peak, is_backward(graph))
        return run

    inductor.compile_in_segments = recording
    _title, make, _checkpointed, inputs = gpu.MODELS[args.model]
    torch.manual_seed(0)
    model, x = make().cuda(), inputs()
    if args.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    budget = core.least_budget(model, x, compile=True) if args.budget == "minimum" else args.budget
    plan = memplan.optimize(model, budget, example_inputs=(x,), compile=True, method=args.method)
    for _ in range(2):
        core.step(plan.module, x)
    for p in model.parameters():
        p.grad = None
    torch.cuda.synchronize()
    records.clear()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    core.step(plan.module, x)
    step_peak = max(r["before"] + r["peak"] for r in records)  # the segments reset the count
    print(f"{args.model} at {plan.budget_bytes / MiB:.1f} MiB ({plan.method}): step peak "
          f"{step_peak / MiB:.1f} MiB, predicted {plan.predicted_peak_bytes / MiB:.1f} MiB, "
          f"{len(records)} segments run, start {start / MiB:.1f} MiB")
    print("| segment | live before MiB | measured peak MiB | + above before | planned + | "
          "excess MiB | end Δ measured | end Δ planned | ops |")
    print("|---|---|---|---|---|---|---|---|---|")
    top = sorted(range(len(records)), key=lambda i: -(records[i]["before"] + records[i]["peak"]))
    excess = sorted(range(len(records)), key=lambda i: records[i]["planned_peak"] - records[i]["peak"])
    for i in sorted(set(top[:8] + excess[:8])):
        r = records[i]
        print(f"| {i} | {r['before'] / MiB:.1f} | {(r['before'] + r['peak']) / MiB:.1f} "
              f"| {r['peak'] / MiB:.1f} | {r['planned_peak'] / MiB:.1f} "
              f"| {(r['peak'] - r['planned_peak']) / MiB:+.1f} | {r['end'] / MiB:+.1f} "
              f"| {r['planned_end'] / MiB:+.1f} | {r['ops']} |")
    result = plan._result()
    rows = print_against_whole_graphs(simulate(result.graph, result.chosen.program),
                                      args.dump / "segments.json" if args.dump else None)
    worst = sorted((row for row in rows if row["graph"] == "backward" and row["simulated_peak"]),
                   key=lambda row: row["simulated_peak"] - row["absolute_peak"],
                   reverse=args.probe_under)[:args.probe]
    if args.dump:
        for i in sorted({*excess[:3], *excess[-3:], *(row["segment"] for row in worst)}):
            dump(args.dump, i, records[i])
    if worst:
        joint = next(iter(plan.module._steps.values()))[0].fx_joint
        print_probes([records[row["segment"]] for row in worst], result.graph, joint, plan.module, x)


def print_probes(probed: list[dict], graph, joint: fx.GraphModule, module: torch.nn.Module,
                 x: torch.Tensor) -> None:
    """One more step, the probed segments running their ops eagerly too: per op with scratch
    memory, measured against the plan's workspace, and the plan's measurement repeated on
    random arguments of the same layout on this thread (autograd's) and on a new one; with the
    layout the joint graph, which the plan measured, gives the same op's arguments."""
    joint_nodes = {node.name: node for node in joint.graph.nodes}
    for record in probed:
        record["segment"].probe = True
    core.step(module, x)
    for record in probed:
        segment = record["segment"]
        print(f"\nSegment of {segment.names[0]}..{segment.names[-1]}: ops with scratch memory, "
              "eager on copies of its inputs (MiB), against the plan's workspace")
        print("| op | target | scratch | planned workspace | measured so here | on a new thread "
              "| tensor arguments (shape, stride, offset, address mod 256) | in the joint graph |")
        print("|---|---|---|---|---|---|---|---|")
        for row in segment.probe_rows:
            planned = graph[row["name"]].workspace_bytes if row["name"] in graph.index else None
            if row["scratch"] > MiB or (planned or 0) > MiB:
                node = joint_nodes.get(row["name"])
                in_joint = node and [(tuple(a.meta["val"].shape), a.meta["val"].stride())
                                     for a in node.all_input_nodes
                                     if isinstance(a.meta.get("val"), torch.Tensor)]
                print(f"| {row['name']} | {row['op']} | {row['scratch'] / MiB:.1f} | "
                      f"{'–' if planned is None else f'{planned / MiB:.1f}'} "
                      f"| {row.get('here', 0) / MiB:.1f} | {row.get('new_thread', 0) / MiB:.1f} "
                      f"| {row['layouts']} | {in_joint} |")


def print_against_whole_graphs(timeline, json_path: Path | None) -> None:
    """Each segment's start and peak against its whole graph run in its order, both relative
    to the graph's start: where the step departs from the plan, across segments or within; and
    against the plan's simulation (``timeline``: absolute, with op scratch memory) at the same
    nodes: its first, and the most any of them reached."""
    simulated: dict[str, int] = {}
    for step, live in zip(timeline.steps, timeline.live_bytes):
        simulated.setdefault(step, live)  # the first time a node runs
    graph_start: dict[int, int] = {}
    for r in records:
        graph_start.setdefault(r["whole"][0], r["before"])
    rows = []
    for i, r in enumerate(records):
        index, start, peak, backward = r["whole"]
        phase = "backward" if backward else "forward"
        lives = [simulated[f"{phase}:{name}"] for name in r["names"] if f"{phase}:{name}" in simulated]
        rows.append(dict(segment=i, graph=phase, start=(r["before"] - graph_start[index]) / MiB,
                         start_in_order=start / MiB,
                         peak=(r["before"] + r["peak"] - graph_start[index]) / MiB,
                         peak_in_order=peak / MiB, absolute_start=r["before"] / MiB,
                         absolute_peak=(r["before"] + r["peak"]) / MiB,
                         simulated_first=lives[0] / MiB if lives else None,
                         simulated_peak=max(lives) / MiB if lives else None))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, indent=1))
    print("\nAgainst the whole graph's order (MiB above the graph's start) and the plan's "
          "simulation (absolute MiB):\n")
    print("| segment | graph | start | in order | peak | in order | excess | absolute start "
          "| simulated at first node | absolute peak | simulated peak | against simulated |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    known = [row for row in rows if row["simulated_peak"] is not None]
    top = sorted(rows, key=lambda row: -row["absolute_peak"])[:8]
    worst = sorted(known, key=lambda row: row["simulated_peak"] - row["absolute_peak"])[:8]
    firsts = [next(row for row in rows if row["graph"] == phase) for phase in ("forward", "backward")]
    for row in sorted({row["segment"]: row for row in top + worst + firsts}.values(),
                      key=lambda row: row["segment"]):
        simulated_peak = row["simulated_peak"] or float("nan")
        print(f"| {row['segment']} | {row['graph']} | {row['start']:.1f} | {row['start_in_order']:.1f} "
              f"| {row['peak']:.1f} | {row['peak_in_order']:.1f} "
              f"| {row['peak'] - row['peak_in_order']:+.1f} | {row['absolute_start']:.1f} "
              f"| {row['simulated_first'] or float('nan'):.1f} | {row['absolute_peak']:.1f} "
              f"| {simulated_peak:.1f} | {row['absolute_peak'] - simulated_peak:+.1f} |")
    for phase in ("forward", "backward"):
        mine = [row for row in rows if row["graph"] == phase]
        print(f"\n{phase} graph: starts at {mine[0]['absolute_start']:.1f} MiB; peak above it "
              f"measured {max(r['peak'] for r in mine):.1f}, in its order "
              f"{max(r['peak_in_order'] for r in mine):.1f} MiB")
    return rows


def dump(directory: Path, index: int, record: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for node in record["graph"].graph.nodes:
        val = node.meta.get("val")
        shape = (f"{tuple(val.shape)} {val.dtype} stride {val.stride()} "
                 f"{val.untyped_storage().nbytes() / MiB:.2f} MiB"
                 if isinstance(val, torch.Tensor) else "")
        lines.append(f"{node.name} = {node.target}{tuple(map(str, node.args))}  # {shape}")
    (directory / f"segment{index}.fx.txt").write_text("\n".join(lines))
    (directory / f"segment{index}.py").write_text(record["source"] or "")


if __name__ == "__main__":
    main()
