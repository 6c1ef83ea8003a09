"""Python's garbage collector and the large, long-lived graphs memplan builds.

A full collection walks every object the collector tracks; a deep model's traced graphs are
millions of them, alive until the step is built. memplan's own stages allocate enough to
trigger full collections over and over, and make little cyclic garbage: they run with none.
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
