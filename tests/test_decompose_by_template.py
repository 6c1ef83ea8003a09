"""Ops decomposed by copies of one trace per signature (BatchNorm's, ReLU's backward, detach)
give the joint graph that decomposing each during aot_autograd's trace gives: the same ops on
the same arguments, in the same order, with the same metadata and values, and the same storages
shared."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

import memplan.inductor
from memplan.capture import _flat_module
from memplan.passes.decompose_by_template import TEMPLATED
from zoo import build


class _Captured(Exception):
    """Raised by the partition function: the joint graph is all the test needs."""


def joint_graph(name: str, device: str) -> fx.Graph:
    """The joint graph memplan's partition function is given on the compiled path."""
    case = build(name)
    model = case.model.to(device)
    args, kwargs = pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v,
                                   (case.args, case.kwargs))
    gm, _, _ = _flat_module(model, args, kwargs)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    inputs = [fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
              for t in pytree.tree_leaves((args, kwargs))]
    captured = []

    def partition(joint: fx.GraphModule, _inputs, **_):
        captured.append(joint.graph)
        raise _Captured

    with pytest.raises(_Captured):
        memplan.inductor.compile_with_inductor(gm, inputs, partition)
    return captured[0]


def describe(graph: fx.Graph) -> list[tuple]:
    """Each node without its name: op, arguments by position, metadata, value, shared storage."""
    position = {node: i for i, node in enumerate(graph.nodes)}
    first_seq_nr = min(node.meta["seq_nr"] for node in graph.nodes if "seq_nr" in node.meta)
    storages: dict[StorageWeakRef, int] = {}

    def value(v):
        if not isinstance(v, torch.Tensor):
            return v
        storage = storages.setdefault(StorageWeakRef(v.untyped_storage()), len(storages))
        return (tuple(v.shape), v.stride(), v.storage_offset(), v.dtype, v.device, storage,
                v.untyped_storage().nbytes(), type(v).__name__)

    described = []
    for node in graph.nodes:
        meta = {key: str(item) for key, item in node.meta.items()
                if key not in ("val", "seq_nr", "from_node", "desc")}
        described.append((
            node.op, str(node.target),
            fx.node.map_arg((node.args, node.kwargs), lambda n: position[n]),
            node.meta.get("seq_nr", first_seq_nr) - first_seq_nr,
            meta, pytree.tree_map(value, node.meta.get("val"))))
    return described


# On CUDA the trace dispatches BatchNorm to cuDNN's, whose decomposition writes the running
# statistics in place.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["densenet40", "mlp", "stateful_norms"])
def test_ops_copied_from_templates_give_the_traced_graph(name, device, monkeypatch):
    copied = joint_graph(name, device)
    assert not any(node.target in TEMPLATED for node in copied.nodes)
    monkeypatch.setattr(memplan.inductor, "TEMPLATED", ())  # every op decomposed as traced
    traced = joint_graph(name, device)
    names = {str(op) for op in TEMPLATED}  # original_aten is another object of the same op
    assert sum(str(node.meta.get("original_aten")) in names for node in traced.nodes) > 20
    assert describe(copied) == describe(traced)
