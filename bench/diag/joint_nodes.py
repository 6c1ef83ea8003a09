"""Which modules a compiled plan's joint graph is made of: its nodes counted by the type of the
module they come from, forward and backward, on the CPU with inductor's decompositions (the
compiled path's graph, inductor stubbed). The trace costs about the same per node, so this is
where aot_autograd's tracing time goes.

    python bench/diag/joint_nodes.py MODEL [--batch N] [--ops TYPE ...]

MODEL is as in ``segment_reuse.py``. ``--ops`` also lists the ops of those module types' nodes,
per instance.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
import torch._inductor.compile_fx as compile_fx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import segment_reuse  # noqa: E402

import memplan  # noqa: E402
from memplan.graph import Phase  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, help="default: 64 images, 8 sequences")
    parser.add_argument("--ops", nargs="*", default=[], metavar="TYPE")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, x = segment_reuse.build(args.model, args.batch or (8 if args.model == "gpt2m" else 64))
    compile_fx.compile_fx_inner = lambda graph, inputs, **options: (lambda boxed_args: None)
    plan = memplan.optimize(model, "100%", example_inputs=(x,), method="none", compile=True)
    graph = plan._result().graph
    modules = dict(model.named_modules())
    counts: collections.Counter[tuple[str, Phase]] = collections.Counter()
    instances: dict[str, set[str]] = collections.defaultdict(set)
    ops: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for node in graph.nodes:
        if node.phase not in (Phase.FORWARD, Phase.BACKWARD):
            continue
        module = modules.get(node.module_path)
        kind = type(module).__name__ if module is not None else "(no module)"
        counts[kind, node.phase] += 1
        instances[kind].add(node.module_path)
        ops[kind][node.op] += 1
    total = sum(counts.values())
    print(f"{args.model}: {total:,} forward and backward nodes")
    print("| module type | instances | forward nodes | backward nodes | share | nodes per instance |")
    print("|---|---|---|---|---|---|")
    for kind in sorted(instances, key=lambda k: -(counts[k, Phase.FORWARD] + counts[k, Phase.BACKWARD])):
        forward, backward = counts[kind, Phase.FORWARD], counts[kind, Phase.BACKWARD]
        print(f"| {kind} | {len(instances[kind]):,} | {forward:,} | {backward:,} | "
              f"{(forward + backward) / total:.1%} | {(forward + backward) / len(instances[kind]):.1f} |")
    for kind in args.ops:
        print(f"{kind}, per instance: " + ", ".join(
            f"{op} {count / len(instances[kind]):g}" for op, count in ops[kind].most_common()))


if __name__ == "__main__":
    main()
