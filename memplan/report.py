"""The plan, told: budget, predicted peaks, overhead, and what each part of the model keeps."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from memplan.graph import JointGraph, Phase

if TYPE_CHECKING:
    from memplan.api import PlanResult


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _segment(path: str, depth: int = 2) -> str:
    return ".".join(path.split(".")[:depth]) if path else "(top level)"


def segments(graph: JointGraph, saved: tuple[str, ...], recomputed: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per module-path prefix: forward values kept and recomputed, and the bytes kept."""
    resident = graph._primal_storages
    rows: dict[str, dict[str, Any]] = defaultdict(lambda: {"kept": 0, "recomputed": 0, "kept_bytes": 0})
    counted: set[int] = set()
    for name in saved:
        node = graph[name]
        if node.phase is not Phase.FORWARD:
            continue
        row = rows[_segment(node.module_path)]
        row["kept"] += 1
        new = [s for s in node.storages if s not in resident and s not in counted]
        counted.update(new)
        row["kept_bytes"] += sum(graph.storages[s].nbytes for s in new)
    for name in recomputed:
        rows[_segment(graph[name].module_path)]["recomputed"] += 1
    order = {}
    for node in graph.nodes:
        order.setdefault(_segment(node.module_path), len(order))
    return [{"module": key, **rows[key]} for key in sorted(rows, key=lambda k: order.get(k, 0))]


def to_dict(result: PlanResult) -> dict[str, Any]:
    chosen, baseline = result.chosen, result.baseline
    timeline = chosen.timeline
    return {
        "device": result.device,
        "budget_bytes": result.budget_bytes,
        "headroom_bytes": result.headroom_bytes,
        "cuda_graphs_bytes": result.graphs_bytes,
        "method": chosen.method,
        "solve_time_s": chosen.solve_time_s,
        "gap": chosen.gap,
        "solver_detail": chosen.detail,
        "baseline": {"peak_bytes": baseline.peak_bytes, "peak_at": baseline.timeline.peak_node,
                     "breakdown": baseline.timeline.peak_breakdown},
        "planned": {"peak_bytes": chosen.peak_bytes, "peak_at": timeline.peak_node,
                    "breakdown": timeline.peak_breakdown,
                    "predicted_overhead": chosen.overhead,
                    "recompute_s": chosen.recompute_s, "step_s": chosen.step_s,
                    "offload_wait_s": chosen.stall_s},
        "offloaded": {"values": len(chosen.program.offloaded),
                      "bytes": sum(result.graph.storages[s].nbytes
                                   for t in chosen.program.offloaded
                                   for s in result.graph[t.name].storages)},
        "alternatives": [{"method": s.method, "peak_bytes": s.peak_bytes, "feasible": s.feasible,
                          "predicted_overhead": s.overhead, "solve_time_s": s.solve_time_s}
                         for s in result.alternatives],
        "segments": segments(result.graph, chosen.program.saved, chosen.program.recomputed),
        "timeline_bytes": list(timeline.live_bytes),
    }


def render_text(result: PlanResult) -> str:
    data = to_dict(result)
    base, planned = data["baseline"], data["planned"]
    lines = [
        f"memplan plan on {data['device']}",
        f"  budget            {_size(data['budget_bytes'])}"
        + (f"  (planned to {_size(data['budget_bytes'] - data['headroom_bytes'])}: "
           "headroom for CUDA allocator memory)" if data["headroom_bytes"] else ""),
        f"  unplanned peak    {_size(base['peak_bytes'])}  at {base['peak_at']}",
        f"  planned peak      {_size(planned['peak_bytes'])}  at {planned['peak_at']}"
        f"  ({planned['peak_bytes'] / max(1, base['peak_bytes']):.0%} of unplanned)",
        *([f"  CUDA graphs       +{_size(data['cuda_graphs_bytes'])} beside it (static inputs, "
           "output gradients, buffers' copy)"] if data["cuda_graphs_bytes"] else []),
        f"  overhead          +{planned['predicted_overhead']:.1%} step time (predicted: recomputation"
        + (" and offload waits)" if data['offloaded']['values'] else ")"),
        *([f"  offloaded         {data['offloaded']['values']} values, "
           f"{_size(data['offloaded']['bytes'])} each way to host memory; the device waits "
           f"{planned['offload_wait_s'] * 1e3:.1f} ms for them (predicted)"]
          if data["offloaded"]["values"] else []),
        f"  method            {data['method']}  (solved in {data['solve_time_s']:.2f} s"
        + ("" if data["gap"] is None else f", optimality gap {data['gap']:.1%}") + ")",
        *([f"  solver            {data['solver_detail']}"] if data["solver_detail"] else []),
        "  peak by category  " + ", ".join(f"{k} {_size(v)}" for k, v in planned["breakdown"].items()),
        "",
        "  schedules tried:",
    ]
    for alt in data["alternatives"]:
        fits = "fits" if alt["feasible"] else "over budget"
        lines.append(f"    {alt['method']:<12} peak {_size(alt['peak_bytes']):>12}  "
                     f"+{alt['predicted_overhead']:.1%}  {fits}")
    lines += ["", f"  {'module':<40} {'kept':>6} {'recomputed':>11} {'kept bytes':>12}"]
    for row in data["segments"]:
        lines.append(f"  {row['module'][:40]:<40} {row['kept']:>6} {row['recomputed']:>11} "
                     f"{_size(row['kept_bytes']):>12}")
    return "\n".join(lines)
