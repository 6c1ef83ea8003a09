"""Small graphs with known structure; sizes in 1 MiB units so peaks are whole numbers."""

import random

from memplan.remat import make_graph

MIB = 2**20


def chain(n, times=None, sizes=None):
    names = [f"n{i}" for i in range(n)]
    return make_graph(names, times or [1] * n, [s * MIB for s in (sizes or [1] * n)],
                      [(names[i], names[i + 1]) for i in range(n - 1)])


def diamond():
    return make_graph(["a", "b", "c", "d"], [1, 2, 3, 1], [MIB, 2 * MIB, MIB, MIB],
                      [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])


def unet(depth):
    """Encoder e0..e{d-1}, decoder d{d-1}..d0 with skips e_i -> d_i (a training-graph shape)."""
    enc, dec = [f"e{i}" for i in range(depth)], [f"d{i}" for i in reversed(range(depth))]
    names = enc + dec
    edges = [(a, b) for a, b in zip(names, names[1:])] + [(f"e{i}", f"d{i}") for i in range(depth - 1)]
    times = [1 + i % 3 for i in range(len(names))]
    return make_graph(names, times, [MIB * (1 + i % 2) for i in range(len(names))], edges)


def random_dag(n, seed, edge_prob=0.35, max_bytes=4, max_time=5):
    rng = random.Random(seed)
    names = [f"v{i}" for i in range(n)]
    edges = [(names[i], names[j]) for j in range(n) for i in range(j) if rng.random() < edge_prob]
    times = [rng.randint(1, max_time) for _ in range(n)]
    return make_graph(names, times, [rng.randint(0, max_bytes) * MIB for _ in range(n)], edges)


def no_recompute_peak(graph):
    from memplan.remat import solve

    return solve(graph, 2**62, method="no-recompute").peak_bytes
