"""The planned graphs' training BatchNorms go to cuDNN where eager PyTorch's would.

This machine has no GPU: the graphs of a CPU plan are given CUDA metadata, and cuDNN's reserve
space size (which needs a device) is stubbed. On a GPU, ``bench/diag/compiled_time.py --check``
compares the step with eager PyTorch's, bitwise.
"""

import collections
import copy

import pytest
import torch
from harness import run_step
from torch._subclasses.fake_tensor import FakeTensorMode
from zoo import build

import memplan
from memplan.passes.cudnn_batch_norm import use_cudnn_batch_norm

aten = torch.ops.aten


@pytest.fixture(scope="module")
def planned_graphs():
    """DenseNet-40's forward and backward graphs at a budget where some BatchNorms are
    recomputed in the backward."""
    case = build("densenet40")
    plan = memplan.optimize(case.model, "40%", example_inputs=case.args)
    run_step(plan.module, case, seed=0)
    step, _ = next(iter(plan.module._steps.values()))
    return step.fx_compiled[:2]


def on_cuda(graph_module, *, reserve_bytes=0, monkeypatch):
    """A copy of ``graph_module`` whose values claim to live on a CUDA device."""
    monkeypatch.setattr(torch._C, "_get_cudnn_batch_norm_reserve_space_size",
                        lambda value, training: reserve_bytes)
    copied = copy.deepcopy(graph_module)
    with FakeTensorMode():
        for node in copied.graph.nodes:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor):
                node.meta["val"] = torch.empty_strided(value.shape, value.stride(),
                                                       dtype=value.dtype, device="cuda")
    return copied


def targets(graph_module) -> dict:
    return collections.Counter(node.target for node in graph_module.graph.nodes
                               if "batch_norm" in str(node.target))


def test_forward_and_backward_batch_norms_go_to_cudnn(planned_graphs, monkeypatch):
    forward, backward = (on_cuda(g, monkeypatch=monkeypatch) for g in planned_graphs)
    before = targets(forward), targets(backward)
    assert before[0] == {aten._native_batch_norm_legit.default: 39}
    recomputed = before[1].get(aten._native_batch_norm_legit.no_stats, 0)
    assert recomputed > 0 and before[1][aten.native_batch_norm_backward.default] == 39

    on_cudnn = set()
    use_cudnn_batch_norm(forward, on_cudnn)
    use_cudnn_batch_norm(backward, on_cudnn)
    assert targets(forward) == {aten.cudnn_batch_norm.default: 39}
    assert targets(backward) == {aten.cudnn_batch_norm.default: recomputed,
                                 aten.cudnn_batch_norm_backward.default: 39}
    for node in backward.graph.find_nodes(op="call_function",
                                          target=aten.cudnn_batch_norm.default):
        assert node.args[3:6] == (None, None, True)  # batch statistics, no running update
    for node in backward.graph.find_nodes(op="call_function",
                                          target=aten.cudnn_batch_norm_backward.default):
        reserve = node.args[8]
        assert reserve.target is aten.empty.memory_format and reserve.args == ([0],)
    forward.graph.lint()
    backward.graph.lint()


def test_batch_norms_stay_on_aten_where_eager_would_not_call_cudnn(planned_graphs, monkeypatch):
    forward, _ = planned_graphs
    unchanged = copy.deepcopy(forward)
    use_cudnn_batch_norm(unchanged, set())  # CPU values
    assert targets(unchanged) == {aten._native_batch_norm_legit.default: 39}

    with_reserve = on_cuda(forward, reserve_bytes=512, monkeypatch=monkeypatch)
    use_cudnn_batch_norm(with_reserve, set())  # the backward would need the reserve space saved
    assert targets(with_reserve) == {aten._native_batch_norm_legit.default: 39}

    cudnn_off = on_cuda(forward, monkeypatch=monkeypatch)
    with torch.backends.cudnn.flags(enabled=False):
        use_cudnn_batch_norm(cudnn_off, set())
    assert targets(cudnn_off) == {aten._native_batch_norm_legit.default: 39}


def test_without_a_bias_batch_norm_stays_on_aten_as_in_eager(planned_graphs, monkeypatch):
    forward = on_cuda(planned_graphs[0], monkeypatch=monkeypatch)
    for node in forward.graph.find_nodes(op="call_function",
                                         target=aten._native_batch_norm_legit.default):
        node.args = (*node.args[:2], None, *node.args[3:])
    use_cudnn_batch_norm(forward, set())
    assert targets(forward) == {aten._native_batch_norm_legit.default: 39}


def test_recomputations_and_backwards_follow_their_forward(planned_graphs, monkeypatch):
    """A forward BatchNorm left on ATen's kernels keeps its recomputation and backward there;
    a backward that needs no input gradient stays on ATen's (cuDNN's would compute one)."""
    forward, backward = (on_cuda(g, monkeypatch=monkeypatch) for g in planned_graphs)
    alone = copy.deepcopy(backward)
    use_cudnn_batch_norm(alone, set())  # no forward on cuDNN
    assert aten.cudnn_batch_norm.default not in targets(alone)
    assert aten.cudnn_batch_norm_backward.default not in targets(alone)

    first = next(iter(backward.graph.find_nodes(op="call_function",
                                                target=aten.native_batch_norm_backward.default)))
    first.args = (*first.args[:9], [False, True, True])
    on_cudnn = set()
    use_cudnn_batch_norm(forward, on_cudnn)
    use_cudnn_batch_norm(backward, on_cudnn)
    assert first.target is aten.native_batch_norm_backward.default
    assert targets(backward)[aten.cudnn_batch_norm_backward.default] == 38
