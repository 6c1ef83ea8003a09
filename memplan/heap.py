"""Python's garbage collector and the large, long-lived graphs memplan builds.

A full collection walks every object the collector tracks; a deep model's traced graphs are
millions of them, alive until the step is built, and tracing, planning and compiling allocate
enough to trigger full collections over and over. Frozen (``gc.freeze``), the objects alive
when a stage starts are passed over by its collections; what the stage makes is collected as
usual. memplan's own stages, which make little cyclic garbage, run with no collections at all.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

_holding = False  # whether memplan froze the heap itself


@contextlib.contextmanager
def frozen() -> Iterator[None]:
    """The objects alive now are left out of collections until the outermost ``frozen`` ends.

    A heap the caller froze is left as it is: it would be memplan's to unfreeze, and the
    caller's objects would be collected again."""
    global _holding
    if gc.get_freeze_count() and not _holding:
        yield
        return
    outermost = not _holding
    gc.freeze()
    _holding = True
    try:
        yield
    finally:
        if outermost:
            _holding = False
            gc.unfreeze()


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
