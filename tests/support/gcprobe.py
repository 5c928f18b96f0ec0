"""What only the cyclic collector would free: objects left in reference cycles."""

from __future__ import annotations

import contextlib
import gc
from collections import Counter
from collections.abc import Iterator


@contextlib.contextmanager
def cyclic_garbage() -> Iterator[Counter[str]]:
    """Collect what is garbage already, then, with the collector off, run the block; at the
    end, the types of every object that became unreachable but was not freed by reference
    counting (kept in cycles), counted by `module.qualname` into the yielded Counter. The
    collector's state is restored whatever happens."""
    found: Counter[str] = Counter()
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield found
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found.update(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()
