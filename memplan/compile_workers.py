"""Compile inductor's graphs in worker processes, several at once.

Inductor compiles one graph at a time, in the calling process: ResNet-1001's distinct segments
(109 compilations) took 45 s of its 140 s plan and compile on an H200
(bench/results/compiled_resnet_h200.md). Segments whose inputs' strides are planned do not wait
for each other's results, so ``WorkerPool.compiling`` hands each graph inductor would compile to a
pool of worker processes, through inductor's own out-of-process compile (the ``subprocess`` FX
compile mode, which runs one worker), and loads the compiled modules here once all are handed
out. Inductor sends only graphs of ATen ops; one that calls another op (memplan's dropout, a
prim) is compiled here. The workers are spawned: each imports torch and this module and, on
CUDA, holds a context of its own until ``close``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import Future
from typing import Any, Callable, Iterator, Sequence
from unittest import mock

import torch._inductor.compile_fx as compile_fx
import torch._inductor.compile_fx_ext as compile_fx_ext
from torch._guards import TracingContext, tracing
from torch._inductor.compile_fx_subproc import _SubprocessFxCompile
from torch._inductor.compile_worker.subproc_pool import SubprocKind, SubprocPool
from torch._inductor.output_code import OutputCode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from memplan.errors import WorkerError
from memplan.heap import collecting

# The environment a worker compiles in: where inductor and Triton keep their caches.
CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def default_workers() -> int:
    """One worker per core this process may run on, at most 8: on ResNet-1001 (H200, 16 cores)
    16 workers were mostly idle, handed 109 graphs over 18 s that they compiled in 45 s all
    told, and each held 520 MiB of the GPU."""
    return min(8, len(os.sched_getaffinity(0)))


class WorkerPool:
    """Worker processes that compile inductor's graphs; started at once, so that they have
    imported torch by the time the first graph comes."""

    def __init__(self, workers: int):
        self._pool = SubprocPool(workers, kind=SubprocKind.SPAWN)
        for _ in range(workers):
            self._pool.submit(_ready)

    def close(self) -> None:
        self._pool.shutdown()

    @contextlib.contextmanager
    def compiling(self) -> Iterator[None]:
        """Within, inductor's ``compile_fx_inner`` returns at once, its graph handed to a worker;
        on leaving, each returned callable is loaded with its compiled module."""
        in_process = compile_fx.fx_codegen_and_compile
        handed_out: list[_CompiledInWorker] = []

        def hand_out(gm: Any, example_inputs: Sequence[Any], inputs_to_check: Sequence[int],
                     **graph_kwargs: Any) -> OutputCode:
            scheme = _SubprocessFxCompile()
            # Sent with a tracing context of its own: the caller's holds the whole graph's
            # parameters (2.3 MB pickled per segment of ResNet-1001, 0.8 s).
            with tracing(TracingContext(TracingContext.get().fake_mode)):
                serialized = scheme.serialize_compile(gm, example_inputs, inputs_to_check,
                                                      {k: v for k, v in graph_kwargs.items()
                                                       if k != "compile_region_name"})
            if serialized is None:  # a graph inductor cannot pickle: compiled here, collecting
                with collecting():
                    return in_process(gm, example_inputs, inputs_to_check, **graph_kwargs)
            pickled, constants = serialized
            environment = {name: os.environ[name] for name in CACHE_VARIABLES if name in os.environ}
            future = self._pool.submit(_compile, pickled, environment)

            def load(result: Any) -> OutputCode:
                output = result.deserialize(constants)
                scheme._postprocess(output)  # the worker's logs, warnings and counters
                return output.graph

            handed_out.append(_CompiledInWorker(future, load))
            return handed_out[-1]

        quiet = _QuietUnpicklable()
        compile_fx_ext.log.addFilter(quiet)  # the logger that warns
        try:
            with mock.patch.object(compile_fx, "fx_codegen_and_compile", hand_out):
                yield
        finally:
            compile_fx_ext.log.removeFilter(quiet)
        for compiled in handed_out:
            compiled.load()


class _QuietUnpicklable(logging.Filter):
    """Inductor warns, with a traceback, of each graph it does not send to a worker: one that calls
    an op outside ATen (memplan's dropout, a prim), which is compiled here, as designed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unable to pickle input graph")


class _CompiledInWorker(OutputCode):
    """What ``compile_fx_inner`` returns for a graph handed to a worker: it keeps the arguments of
    ``post_compile`` until the compiled module is loaded, and then calls it."""

    _boxed_call = True

    def __init__(self, future: Future, load: Callable[[Any], OutputCode]):
        self._future, self._load = future, load
        self._post_compile_arguments: tuple | None = None
        self._compiled: OutputCode | None = None

    def post_compile(self, *arguments: Any) -> None:
        self._post_compile_arguments = arguments

    def load(self) -> None:
        try:
            result = self._future.result()
        except Exception as error:
            raise WorkerError("memplan: a worker process failed to compile a segment (its error is "
                              "the cause); set memplan.inductor.WORKERS = 1 to compile the segments "
                              "in this process") from error
        # In a tracing context of its own: the worker returns its shape environment, which
        # unpickles into the context's fake mode (memplan's has none, its shapes being static),
        # and ``post_compile`` reports the output strides to the context, where the caller's
        # has taken the planned ones already.
        with tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv()))):
            compiled = self._load(result)
            compiled.post_compile(*self._post_compile_arguments)
        self._compiled = compiled

    def __call__(self, inputs: list) -> Any:
        return self._compiled(inputs)


def _ready() -> None:
    """A worker's first job: importing what ``_compile`` needs, before any graph comes."""
    import torch._inductor.compile_fx  # noqa: F401


def _compile(pickled: Any, environment: dict[str, str]) -> Any:
    return _SubprocessFxCompile._run_in_child_subprocess(pickled, environment)
