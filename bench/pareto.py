"""Memory against time, one PNG per model, from the rows bench/gpu.py wrote.

    python bench/pareto.py bench/results

reads every ``gpu_<model>*.json`` there and writes ``pareto_<model>.png`` beside it. Files of
one model from several processes (a ``--compile`` run split over device calls) share a plot; each
process measured its own naive row, drawn with the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import MODELS  # noqa: E402

GiB = 2**30
STYLE = {  # kind -> (color, marker)
    "naive eager": ("black", "o"),
    "built-in checkpointing": ("tab:gray", "s"),
    "torch.compile": ("tab:orange", "^"),
    "memplan eager": ("tab:blue", "D"),
    "memplan compiled": ("tab:green", "P"),
    "memplan eager + CUDA graphs": ("tab:cyan", "d"),
    "memplan compiled + CUDA graphs": ("tab:olive", "X"),
    "memplan eager + offload": ("tab:purple", "v"),
    "memplan compiled + offload": ("tab:pink", "^"),
}


def model_key(path: Path) -> str:
    """``gpu_densenet100_compiled_b.json`` -> ``densenet100``; the longest of bench/gpu.py's
    model names that the file's name starts with (``gpt2m_sdpa`` before ``gpt2m``)."""
    return max((name for name in MODELS if path.stem.startswith(f"gpu_{name}")), key=len)


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both memory and time, by increasing memory."""
    best: list[tuple[float, float]] = []
    for peak, ms in sorted(points):
        if not best or ms < best[-1][1]:
            best.append((peak, ms))
    return best


def plot(runs: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    seen_kinds = set()
    points = []
    for run in runs:
        for row in run["rows"]:
            color, marker = STYLE[row["kind"]]
            peak, ms = row["peak"] / GiB, row["ms"]
            ax.scatter(peak, ms, color=color, marker=marker, s=50,
                       label=None if row["kind"] in seen_kinds else row["kind"])
            seen_kinds.add(row["kind"])
            label = row["config"].removeprefix("memplan ").removeprefix("torch.compile ")
            ax.annotate(label.replace("activation_memory_budget", "amb"), (peak, ms), fontsize=6,
                        xytext=(4, 3), textcoords="offset points")
            points.append((peak, ms))
    ax.plot(*zip(*frontier(points)), color="tab:red", linewidth=0.8, linestyle="--",
            label="Pareto front")
    devices = sorted({run["device"] for run in runs})
    ax.set_title(f"{runs[0]['model']}\n{', '.join(devices)}, torch {runs[0]['torch']}", fontsize=9)
    ax.set_xlabel("peak memory (GiB, max_memory_allocated)")
    ax.set_ylabel("step time (ms, median of 5)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    runs = defaultdict(list)
    for path in sorted(args.results.glob("gpu_*.json")):
        runs[model_key(path)].append(json.loads(path.read_text()))
    for model, model_runs in runs.items():
        out = args.results / f"pareto_{model}.png"
        plot(model_runs, out)
        print(out)


if __name__ == "__main__":
    main()
