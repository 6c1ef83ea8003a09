"""Which compiled segments set a planned step's peak, and by how much each departs from its graph
order: per segment of memplan's compiled forward and backward, the bytes it adds above what was
live when it began, measured (``max_memory_allocated``) against the segment's fx graph run in
its own order (each value allocated when computed, freed after its last reader there).

    python bench/diag/segment_peaks.py MODEL BUDGET [--ops N] [--dump DIR] [--inductor-order]

MODEL is one of bench/gpu.py's; BUDGET as ``memplan.optimize`` takes it, or ``minimum``.
``--dump`` writes, for the three segments that exceed their graph order most, the fx graph with
each value's shape and bytes and the code inductor generated for it. ``--inductor-order`` leaves
to inductor where it computes the values whose computation frees storage (see
``memplan.inductor._values_that_free_storage``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
from pathlib import Path

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402
import gpu  # noqa: E402

import memplan  # noqa: E402
import memplan.inductor as inductor  # noqa: E402

MiB = 2**20
records: list[dict] = []  # one per segment run, in run order
_compiled: list[tuple[fx.GraphModule, str]] = []  # the segment last compiled, and its code


def graph_order_bytes(graph: fx.GraphModule, freed_inputs: list[bool]) -> tuple[int, int]:
    """Peak and end bytes, relative to the start, of running ``graph`` node by node in its order;
    an input flagged in ``freed_inputs`` is freed after its last reader, as the segments do."""
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
    live, peak, present = 0, 0, set()
    for node in nodes:
        key = key_of.get(node)
        if node.op != "placeholder" and key is not None and key not in present:
            live += storage_bytes[key]
        if key is not None:
            present.add(key)
        peak = max(peak, live)
        for dead in [k for k in present if last_use.get(k) == position[node]]:
            live -= storage_bytes[dead]
            present.discard(dead)
    return peak, live


@dataclasses.dataclass
class RecordedSegment(inductor._Segment):
    def __post_init__(self):
        graph, source = _compiled.pop()
        planned_peak, planned_end = graph_order_bytes(graph, self.last_reads)
        ops = collections.Counter(str(n.target).removeprefix("aten.").split(".")[0]
                                  for n in graph.graph.nodes if n.op == "call_function")
        run = self.run

        def measured(args: list) -> list:
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = run(args)
            records.append(dict(before=before, peak=torch.cuda.max_memory_allocated() - before,
                                end=torch.cuda.memory_allocated() - before,
                                planned_peak=planned_peak, planned_end=planned_end,
                                ops=ops.most_common(4), graph=graph, source=source))
            return out

        self.run = measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=gpu.MODELS)
    parser.add_argument("budget")
    parser.add_argument("--ops", type=int)
    parser.add_argument("--dump", type=Path)
    parser.add_argument("--inductor-order", action="store_true")
    args = parser.parse_args()
    if args.ops:
        inductor.OPS_PER_SEGMENT = args.ops
    torch._inductor.config.force_disable_caches = True  # a cached graph compiles no segments
    inductor._Segment = RecordedSegment
    if args.inductor_order:
        inductor._values_that_free_storage = lambda graph: set()
    compile_in_segments = inductor.compile_in_segments

    def recording(graph, inputs, compile_graph, ops_per_segment, **options):
        def compile_segment(segment, examples):
            compiled = compile_graph(segment, examples)
            _compiled.append((segment, getattr(compiled, "source_code", "")))
            return compiled
        return compile_in_segments(graph, inputs, compile_segment, ops_per_segment, **options)

    inductor.compile_in_segments = recording
    _title, make, _checkpointed, inputs = gpu.MODELS[args.model]
    torch.manual_seed(0)
    model, x = make().cuda(), inputs()
    budget = core.least_budget(model, x, compile=True) if args.budget == "minimum" else args.budget
    plan = memplan.optimize(model, budget, example_inputs=(x,), compile=True)
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
    if args.dump:
        for i in excess[:3]:
            dump(args.dump, i, records[i])


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
