"""Pausing Python's cyclic garbage collector around large builds of acyclic data.

Parsing a big mesh config or building a policy index allocates millions of small objects
that never form cycles; the collections those allocations trigger rescan the whole
half-built structure and double the time. The collector switch is process-wide, so only
the pause that found it on turns it back on, and a pause never leaves it off.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
