"""Segments compiled in worker processes run as those compiled in this process: the same code.

Workers (``memplan.inductor.WORKERS`` above 1) compile segments on CUDA, where their strides
are planned; on the CPU memplan compiles them here, each for the strides the earlier ones report.
The CPU test plans the strides as CUDA does, so that it can compare the two ways on the same
graphs. Each way compiles into a cache directory of its own: from a shared one, the second
would load what the first compiled.
"""

from __future__ import annotations

import re

import pytest
import torch

import memplan
import memplan.compile_workers
import memplan.inductor
from harness import run_step
from zoo import build

pytest.importorskip("torch._inductor.compile_fx")
COMPILE_IN_SEGMENTS, IN_WORKERS = memplan.inductor.compile_in_segments, memplan.inductor._in_workers


def compiled_steps(name: str, monkeypatch, tmp_path, workers: int):
    """Two steps of ``name`` compiled with planned strides, as on CUDA, in ``workers`` workers."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / f"workers{workers}"))
    def with_planned_strides(graph, inputs, compile_graph, ops_per_segment, **options):
        options["planned_strides"] = True
        return COMPILE_IN_SEGMENTS(graph, inputs, compile_graph, ops_per_segment, **options)

    monkeypatch.setattr(memplan.inductor, "compile_in_segments", with_planned_strides)
    monkeypatch.setattr(memplan.inductor, "_in_workers", lambda count: IN_WORKERS(workers))
    monkeypatch.setattr(memplan.inductor, "WORKERS", workers)
    case = build(name)
    plan = memplan.optimize(case.model, 1.0, example_inputs=case.args, method="sqrt", compile=True)
    steps = [run_step(plan.module, case, seed) for seed in (101, 102)]
    return steps, dict(case.model.named_buffers())


def recording_code(monkeypatch) -> list:
    """The compiled segments' code, appended as inductor compiles them (in workers or here)."""
    import torch._inductor.compile_fx as compile_fx

    compile_fx_inner, compiled = compile_fx.compile_fx_inner, []
    monkeypatch.setattr(compile_fx, "compile_fx_inner",
                        lambda *args, **kwargs: compiled.append(compile_fx_inner(*args, **kwargs))
                        or compiled[-1])
    return compiled


def code_of(compiled: list) -> list[str]:
    """Without the first line's comment, which numbers the graphs aot_autograd compiled, and
    with each kernel's file named without its cache directory."""
    code = [getattr(c, "_compiled", c).source_code for c in compiled]
    code = [text.partition("\n")[2] if text.startswith("# AOT ID") else text for text in code]
    return [re.sub(r"(?m)^# kernel path: .*/", "# kernel path: ", text) for text in code]


def assert_same_code(code: list[str], code_here: list[str]) -> None:
    assert len(code) == len(code_here)
    for k, (text, text_here) in enumerate(zip(code, code_here)):
        differing = [pair for pair in zip(text.splitlines(), text_here.splitlines()) if pair[0] != pair[1]]
        assert text == text_here, f"compilation {k}: first differing lines {differing[:2]}"


def test_segments_compiled_in_workers_equal_those_compiled_here(monkeypatch, tmp_path, caplog):
    """The MLP calls memplan's dropout ops: inductor does not send their segments to a worker
    (it pickles no custom op), so those are compiled here, among the others compiled in workers,
    and without inductor's warning that it could not pickle them."""
    loaded = []
    load = memplan.compile_workers._CompiledInWorker.load
    monkeypatch.setattr(memplan.compile_workers._CompiledInWorker, "load",
                        lambda self: loaded.append(self) or load(self))
    collected = []
    collecting = memplan.compile_workers.collecting
    monkeypatch.setattr(memplan.compile_workers, "collecting",
                        lambda: collected.append(1) or collecting())
    compiled = recording_code(monkeypatch)
    in_workers, workers_buffers = compiled_steps("mlp", monkeypatch, tmp_path, 2)
    assert len(loaded) >= 4, "forward and backward segments compiled in the workers"
    assert len(compiled) > len(loaded), "segments with memplan's dropout ops compiled here"
    assert len(collected) == len(compiled) - len(loaded), "collecting, as without workers"
    assert not [r for r in caplog.records if "pickle" in r.getMessage()]
    code, handed_out = code_of(compiled), len(loaded)
    compiled.clear()
    here, buffers = compiled_steps("mlp", monkeypatch, tmp_path, 1)
    assert len(loaded) == handed_out, "one worker: every segment compiled here"
    assert_same_code(code, code_of(compiled))
    for (out, grads, rng), (here_out, here_grads, here_rng) in zip(in_workers, here):
        assert torch.equal(out, here_out)
        assert grads.keys() == here_grads.keys()
        assert all(torch.equal(grads[name], here_grads[name]) for name in grads)
        assert torch.equal(rng, here_rng)
    assert all(torch.equal(workers_buffers[name], buffers[name]) for name in buffers)


def test_a_segment_a_worker_fails_to_compile_names_the_way_to_compile_here(monkeypatch, tmp_path):
    """A worker's failure is raised with the setting that compiles the segments in this process."""
    from torch._inductor.compile_fx_ext import _WireProtocolPickledInput
    from torch._inductor.compile_fx_subproc import _SubprocessFxCompile

    serialize = _SubprocessFxCompile.serialize_compile

    def unreadable(self, *args):
        serialized = serialize(self, *args)
        if serialized is None:  # a graph inductor does not send to a worker
            return None
        pickled, constants = serialized
        return _WireProtocolPickledInput(pickled.value[:-8]), constants

    monkeypatch.setattr(_SubprocessFxCompile, "serialize_compile", unreadable)
    with pytest.raises(memplan.WorkerError, match="memplan.inductor.WORKERS = 1") as raised:
        compiled_steps("mlp", monkeypatch, tmp_path, 2)
    assert "An exception occurred in a subprocess" in str(raised.value.__cause__)


def test_workers_start_only_as_many_as_the_device_has_room_for(monkeypatch):
    """Each worker holds a CUDA context: on a device with little free memory, fewer start."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(memplan.inductor, "WORKERS", 8)
    context = memplan.inductor.WORKER_CONTEXT_BYTES
    with FakeTensorMode():
        on_cuda, on_cpu = torch.empty(2, device="cuda"), torch.empty(2)
    for free_contexts, expected in ((100, 8), (7, 3), (3, 1), (0, 1)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free_contexts * context, 0))
        assert memplan.inductor._workers_for([on_cpu, on_cuda]) == expected
    assert memplan.inductor._workers_for([on_cpu]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_plan_on_cuda_equals_one_compiled_in_this_process(monkeypatch, tmp_path):
    """Workers on CUDA, closed before the first step. Each segment's code is the one compiled
    here. cuDNN's deterministic algorithms leave the values to differ by inductor's reductions
    alone: on an H200, by 1 ulp in two running variances; cuDNN's others differed by up to 6e-4
    of a gradient's norm from run to run."""
    closed = []
    close = memplan.compile_workers.WorkerPool.close
    monkeypatch.setattr(memplan.compile_workers.WorkerPool, "close",
                        lambda self: closed.append(self) or close(self))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    compiled = recording_code(monkeypatch)

    def step(workers: int):
        compiled.clear()
        monkeypatch.setattr(memplan.inductor, "WORKERS", workers)
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / f"workers{workers}"))
        case = build("preact_resnet29")
        model, x = case.model.cuda(), case.args[0].cuda()
        plan = memplan.optimize(model, 0.9, example_inputs=(x,), compile=True)
        assert len(closed) == (workers > 1)
        out = plan.module(x)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).cuda()).sum().backward()
        # on the host: the next plan counts what this process holds on the device
        return code_of(compiled), [t.cpu() for t in [p.grad for p in model.parameters()] + list(model.buffers())]

    code, values = step(memplan.compile_workers.default_workers())
    closed.clear()
    code_here, values_here = step(1)
    assert_same_code(code, code_here)
    for a, b in zip(values, values_here):
        error = (a.double() - b.double()).norm().item()
        assert error <= 1e-6 * b.double().norm().item()
