"""Cost models: the analytic FLOPs are torch's, a small op costs its host dispatch in the eager
executor, the profile cache round-trips and leaves the RNG alone, and an unknown cost model is
refused with the list of known ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import FlopCounterMode

import memplan
from memplan.cost_models import for_device, profile
from zoo import build


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x, image):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = (q @ k.transpose(-1, -2)).softmax(-1)
        return (scores @ v).sum() + F.relu(self.conv(image)).sum()


def test_analytic_flops_equal_torch_flop_counter():
    torch.manual_seed(0)
    model, args = Attention(), (torch.randn(2, 16, 32), torch.randn(2, 4, 8, 8))
    counter = FlopCounterMode(display=False)
    with counter:
        model(*args).backward()
    plan = memplan.optimize(model, "100%", example_inputs=args, method="none")
    graph = plan._result().graph
    counted = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    planned: dict[str, int] = {}
    for node in graph.nodes:
        if node.flops:
            packet = node.op.rsplit(".", 1)[0]
            planned[packet] = planned.get(packet, 0) + node.flops
    assert set(planned) == set(counted) and {"aten.convolution", "aten.bmm"} <= set(planned)
    for op, flops in counted.items():
        assert planned[op] == flops, op


def test_a_small_op_costs_its_host_dispatch_only_where_the_host_dispatches_it():
    """The eager executor dispatches each op; compiled graphs and CUDA graphs' replays do not,
    and a replayed op costs its fitted extra."""
    torch.manual_seed(0)
    model, args = Attention(), (torch.randn(2, 16, 32), torch.randn(2, 4, 8, 8))
    graph = memplan.optimize(model, "100%", example_inputs=args, method="none")._result().graph
    relu = next(n for n in graph.nodes if n.op.startswith("aten.relu."))
    eager = for_device("cuda", "NVIDIA H200")
    compiled = for_device("cuda", "NVIDIA H200", executor="compiled")
    replayed = for_device("cuda", "NVIDIA H200", executor="cuda_graphs")
    roofline = compiled.node_time_s(relu)
    assert roofline < eager.rates.dispatch_s  # a few hundred floats: the host is the bound
    assert eager.node_time_s(relu) == eager.rates.dispatch_s
    assert replayed.node_time_s(relu) == pytest.approx(roofline + eager.rates.replayed_op_s)
    assert for_device("cpu").node_time_s(relu) < eager.rates.dispatch_s
    with pytest.raises(ValueError, match="cuda_graphs"):
        for_device("cuda", "NVIDIA H200", executor="graphs")


def test_float32_products_are_priced_in_the_math_cuda_runs_them_in():
    """On CUDA, cuDNN convolutions run float32 in TF32 by default, cuBLAS products only at
    ``set_float32_matmul_precision("high")``; TF32 and bf16 are priced at their own rates."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from memplan.capture import _precision
    from memplan.graph import Node, Phase

    def step(image, weight, matrix, half):
        return F.conv2d(image, weight), matrix @ matrix, half @ half, image.relu()

    with FakeTensorMode():  # CUDA values without a GPU
        args = (torch.empty(2, 4, 8, 8, device="cuda"), torch.empty(8, 4, 3, 3, device="cuda"),
                torch.empty(64, 64, device="cuda"), torch.empty(64, 64, device="cuda", dtype=torch.bfloat16))
    graph = make_fx(step, tracing_mode="fake")(*args).graph

    def precisions() -> list[str]:
        return [_precision(n) for n in graph.nodes if n.op == "call_function"
                and str(n.target) in ("aten.convolution.default", "aten.mm.default")]

    assert precisions() == ["tf32", "fp32", "bf16"]
    default = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with torch.backends.cudnn.flags(allow_tf32=False):
            assert precisions() == ["fp32", "tf32", "bf16"]
    finally:
        torch.set_float32_matmul_precision(default)
    # torch's newer settings: reading a legacy flag would raise once they are set
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    settings = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision, conv.fp32_precision = "tf32", "ieee"
    try:
        assert precisions() == ["fp32", "tf32", "bf16"]
    finally:
        matmul.fp32_precision, conv.fp32_precision = settings

    h200 = for_device("cuda", "NVIDIA H200", executor="compiled")
    priced = {}
    for op in ("aten.convolution.default", "aten.mm.default"):
        for precision in ("fp32", "tf32", "bf16"):
            node = Node("n", Phase.FORWARD, (), (), op=op, flops=10**13, precision=precision)
            priced[op, precision] = h200.node_time_s(node)
    rates = h200.rates
    assert priced["aten.mm.default", "fp32"] == pytest.approx(
        rates.launch_s + 10**13 / rates.flops_per_s["fp32"])
    assert priced["aten.mm.default", "fp32"] > priced["aten.convolution.default", "tf32"] \
        > priced["aten.mm.default", "tf32"] > priced["aten.mm.default", "bf16"]
    assert priced["aten.convolution.default", "fp32"] == priced["aten.mm.default", "fp32"]
    assert priced["aten.convolution.default", "bf16"] == priced["aten.mm.default", "bf16"]
    cpu = for_device("cpu")  # one rate: every precision at fp32's
    assert cpu.node_time_s(Node("n", Phase.FORWARD, (), (), op="aten.mm.default", flops=10**13,
                                precision="bf16")) == cpu.node_time_s(
        Node("n", Phase.FORWARD, (), (), op="aten.mm.default", flops=10**13, precision="fp32"))


class ConvChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x) * 2 + 1))


def test_compiled_pointwise_ops_move_only_what_enters_and_leaves_their_fusion():
    """Compiled, ``a(x) * 2 + 1`` and its ReLU are one kernel: it reads the convolution's output
    and writes the ReLU's, which the next convolution and the backward read; the sum in between
    moves nothing. Replayed in CUDA graphs, each op is its own kernel."""
    model, x = ConvChain(), torch.randn(4, 8, 16, 16)
    graph = memplan.optimize(model, "100%", example_inputs=(x,), method="none")._result().graph
    compiled = for_device("cuda", "NVIDIA H200", executor="compiled")
    times = compiled.times(graph)
    nbytes = {n.name: sum(graph.storages[s].nbytes for s in graph.allocates[n.name]) for n in graph.nodes}
    bandwidth = compiled.rates.bytes_per_s
    assert times["mul"] == pytest.approx(nbytes["convolution"] / bandwidth)
    assert times["add"] == 0.0
    assert times["relu"] == pytest.approx(nbytes["relu"] / bandwidth)
    assert times["convolution"] > compiled.rates.launch_s  # not pointwise: its own kernel
    replayed = for_device("cuda", "NVIDIA H200", executor="cuda_graphs")
    assert replayed.times(graph)["add"] == replayed.node_time_s(graph["add"]) > replayed.rates.launch_s


class Fusions(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        doubled = self.conv(x) * 2  # read by pointwise ops only: inside their fusions
        return self.fc((doubled + 1).flatten(1)), doubled.relu()


def test_values_a_fusion_writes_are_those_other_kernels_or_the_caller_read():
    """A pointwise value read through a view by a product, or returned, is written to memory;
    one only pointwise ops of its phase read is not."""
    from memplan.cost_models.analytic import _materialised

    model, x = Fusions(), torch.randn(2, 3, 8, 8)
    graph = memplan.optimize(model, "100%", example_inputs=(x,), method="none")._result().graph
    materialised = _materialised(graph)
    assert {"convolution", "add", "relu"} <= materialised
    assert "mul" not in materialised


def test_profiled_times_leave_compiled_pointwise_ops_their_fused_price(monkeypatch):
    """An op timed alone pays its own launch and memory traffic; compiled, a pointwise one runs
    inside a fusion, so the profile model's time replaces only the others'."""
    import memplan.cost_models as cost_models

    model, x = Fusions(), torch.randn(2, 3, 8, 8)
    graph = memplan.optimize(model, "100%", example_inputs=(x,), method="none")._result().graph
    monkeypatch.setattr(cost_models, "profile_times",
                        lambda joint, device, cache: {n.name: 1.0 for n in graph.nodes})
    cpu = torch.device("cpu")
    fused = for_device("cpu", executor="compiled").times(graph)
    for executor in ("compiled", "eager"):
        times = cost_models.node_times("profile", graph, None, cpu, executor=executor)
        pointwise = {n.name for n in graph.nodes if n.pointwise}
        assert pointwise and all(times[name] == (fused[name] if executor == "compiled" else 1.0)
                                 for name in pointwise)
        assert times["convolution"] == 1.0


@pytest.fixture
def timed_calls(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path))
    calls = []
    original = profile.time_call

    def counting(node, device):
        assert _get_current_dispatch_mode() is None, "ops must be timed on real tensors"
        calls.append(node.name)
        return original(node, device)

    monkeypatch.setattr(profile, "time_call", counting)
    return calls


def test_profile_cache_round_trips(timed_calls, tmp_path):
    case = build("gpt2")
    first = memplan.optimize(case.model, "70%", example_inputs=case.args, example_kwargs=case.kwargs,
                             cost_model="profile")
    assert timed_calls and (tmp_path / "op_times.json").exists()
    timed_calls.clear()
    rng = torch.get_rng_state()
    second = memplan.optimize(case.model, "70%", example_inputs=case.args,
                              example_kwargs=case.kwargs, cost_model="profile")
    assert timed_calls == []  # everything came from the cache
    assert torch.equal(rng, torch.get_rng_state())
    assert second.program == first.program
    assert second.predicted_overhead == first.predicted_overhead


def test_profiling_draws_nothing_from_the_callers_rng(timed_calls):
    case = build("gpt2")  # dropout: its ops draw random numbers when timed
    rng = torch.get_rng_state()
    memplan.optimize(case.model, "70%", example_inputs=case.args, example_kwargs=case.kwargs,
                     cost_model="profile")
    assert any("dropout" in name or "rand" in name for name in timed_calls)
    assert torch.equal(rng, torch.get_rng_state())


def test_profile_cache_is_kept_per_math_mode():
    """Times measured with TF32 on are not reused with it off, for convolutions or products."""
    cpu = torch.device("cpu")
    labels = set()
    default = torch.get_float32_matmul_precision()
    try:
        for matmul in ("highest", "high"):
            torch.set_float32_matmul_precision(matmul)
            for tf32 in (True, False):
                with torch.backends.cudnn.flags(allow_tf32=tf32):
                    labels.add(profile.device_label(cpu))
    finally:
        torch.set_float32_matmul_precision(default)
    assert len(labels) == 4


@pytest.mark.parametrize("name", profile._NOT_TIMED)
def test_fused_attention_backwards_keep_their_analytic_price(monkeypatch, tmp_path, name):
    """Run on made-up generator seeds, the efficient attention's backward crashed the process on
    an H200: fused attention backwards are never timed, while other ops are."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    attention = graph.call_function(getattr(torch.ops.aten, name.split(".")[1]).default, (x,))
    relu = graph.call_function(torch.ops.aten.relu.default, (x,))
    monkeypatch.setattr(profile, "time_call", lambda node, device: 1.0)
    times: dict[str, float] = {}
    cache = profile.OpTimeCache(tmp_path / "op_times.json")
    for node in (attention, relu):
        profile._time_node(node, torch.device("cpu"), cache, times)
    assert times == {relu.name: 1.0}


def test_unknown_cost_model_lists_the_known_ones():
    case = build("mlp")
    with pytest.raises(ValueError, match="analytic.*profile"):
        memplan.optimize(case.model, "50%", example_inputs=case.args, cost_model="roofline")


def test_real_arguments_keep_shape_strides_and_broadcasts():
    from memplan.cost_models.workspace import real_argument
    fake = torch.empty(3, 1).expand(3, 5).t()  # stride 0, transposed
    real = real_argument(fake, torch.device("cpu"))
    assert real.shape == fake.shape and real.stride() == fake.stride()
    assert torch.equal(real[0], real[4])  # one row, broadcast
    assert real_argument(torch.empty(0, 4), torch.device("cpu")).shape == (0, 4)


def test_workspaces_are_measured_for_deterministic_ops_but_not_views_or_random_ones():
    """Nor, where inductor compiles the graph, for the ops whose kernels inductor generates."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from memplan.cost_models.workspace import _measured
    from memplan.passes.dropout import replay
    aten = torch.ops.aten

    def step(x, state):  # a replay sets the generator from its argument: not run either
        grad = aten._softmax_backward_data(x, x, -1, torch.float32)
        wide = torch.ops.prims.convert_element_type(x, torch.float64)
        return (grad.view(-1), aten.native_dropout(x, 0.5, True), replay(state, x, 0.5), x.sum(),
                wide, torch.var_mean(x, 0), x @ x)

    graph = make_fx(step, tracing_mode="fake")(torch.randn(4, 4), torch.get_rng_state()).graph
    calls = [n for n in graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls if _measured(n)] == [
        aten._softmax_backward_data.default, torch.ops.prims.convert_element_type.default,
        aten.sum.default, aten.var_mean.correction, aten.mm.default]
    # inductor's decompositions replace the softmax backward, which it has no lowering of
    assert [n.target for n in calls if _measured(n, compiled=True)] == [
        aten._softmax_backward_data.default, aten.mm.default]
