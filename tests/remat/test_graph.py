import json
from pathlib import Path

import pytest

from memplan.remat import Graph, load_graph, make_graph

GRAPHS_DIR = (Path(__file__).parents[2] / ".." / "shared" / "data" / "graphs").resolve()


def _graph_files():
    if not GRAPHS_DIR.is_dir():
        return []
    return sorted(GRAPHS_DIR.glob("*.json"))


@pytest.mark.parametrize("path", _graph_files() or [None], ids=lambda p: p.name if p else "absent")
def test_load_every_shared_graph(path):
    if path is None:
        pytest.skip(f"{GRAPHS_DIR} is absent (CI checks out shared/ beside the repo)")
    g = load_graph(path)
    raw = json.loads(path.read_text())
    edges = raw.get("links", raw.get("edges"))
    assert len(g) == len(raw["nodes"]) > 0
    assert sum(len(p) for p in g.preds) == len(edges)
    assert all(p < i for i, ps in enumerate(g.preds) for p in ps)  # topological numbering
    time_key = "cost_cpu" if "cost_cpu" in raw["nodes"][0] else "duration"
    assert sum(g.time) == sum(n[time_key] for n in raw["nodes"])
    assert load_graph(path) == g  # deterministic


def test_make_graph_orders_topologically_with_stable_ties():
    g = make_graph(["c", "a", "b"], [1, 2, 3], [4, 5, 6], [("a", "b")])
    assert g.names == ("c", "a", "b")
    assert g.preds == ((), (), (1,))
    g = make_graph(["b", "a"], [1, 2], [4, 5], [("a", "b")])
    assert g.names == ("a", "b") and g.time == (2, 1) and g.bytes == (5, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(names=("a",), time=(1,), bytes=(-1,), preds=((),)), "bytes"),
        (dict(names=("a",), time=(-1,), bytes=(1,), preds=((),)), "time"),
        (dict(names=("a", "b"), time=(1, 1), bytes=(1, 1), preds=((1,), ())), "predecessors"),
        (dict(names=("a", "a"), time=(1, 1), bytes=(1, 1), preds=((), ())), "unique"),
        (dict(names=("a",), time=(1, 2), bytes=(1,), preds=((),)), "length"),
    ],
)
def test_graph_rejects_malformed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Graph(**kwargs)


def test_make_graph_rejects_cycle_and_unknown_node():
    with pytest.raises(ValueError, match="cycle"):
        make_graph(["a", "b"], [1, 1], [1, 1], [("a", "b"), ("b", "a")])
    with pytest.raises(ValueError, match="unknown"):
        make_graph(["a"], [1], [1], [("a", "z")])


def test_load_graph_rejects_other_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nodes": [{"id": 0, "weight": 3}], "links": []}))
    with pytest.raises(ValueError, match="cost_cpu"):
        load_graph(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="node-link"):
        load_graph(bad)
