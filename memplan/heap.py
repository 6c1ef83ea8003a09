"""Python's garbage collector and the large, long-lived graphs memplan builds.

A full collection walks every object the collector tracks; a deep model's traced graphs are
millions of them, alive until the step is built. Export, aot_autograd's trace and memplan's
own stages allocate enough to trigger full collections over and over, and keep most of what
they make: they run with none (ResNet-1001's compiled plan took 57.9 s instead of 63.3 s on a
CPU, inductor stubbed, and 0.15 GiB more memory). Inductor's compilations make much cyclic
garbage: they collect, where they run in this process (``memplan.compile_workers``).
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No collections until the end: for memplan's own stages, whose garbage is mostly freed
    by reference counting."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def collecting() -> Iterator[None]:
    """Collections on until the end, within a paused stage: for one that makes much cyclic
    garbage (inductor's compilations)."""
    enabled = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        if not enabled:
            gc.disable()


@contextlib.contextmanager
def frozen() -> Iterator[None]:
    """The objects alive now are left out of collections until the end, so that processes
    forked meanwhile do not write to them when they collect. A heap the caller froze is left as
    it is."""
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        yield
    finally:
        if freeze:
            gc.unfreeze()
