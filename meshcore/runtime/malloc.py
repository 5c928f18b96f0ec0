"""Giving the C allocator's free memory back to the system after a burst (glibc only;
elsewhere a no-op).

After thousands of connections close, glibc keeps the freed heap pages: `free` returns
only the top of the heap, and live objects scattered through it pin the rest of the
range. `malloc_trim` releases every free page (`collect_and_trim` frees the cyclic garbage
first). `IdleTrim` decides when: once the node is quiet after activity, never under load,
where it would only cost time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def trim() -> bool:
    """Return the heap's free memory to the system; True if any was returned."""
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))


def collect_and_trim() -> bool:
    """Free the cyclic garbage first, then trim. A connection's objects refer to each other
    (a protocol and its transport, an HTTP/2 connection and its handler), so they are freed
    by the cyclic collector, which runs only as objects are allocated: on a quiet node it
    may not run for a long time, and memory held by garbage cannot be given back (300
    refused connections: 13 MB kept until traffic came). Called when quiet, never under
    load: a full collection walks every object."""
    gc.collect()
    return trim()


class IdleTrim:
    """When to give freed memory back: after activity (connections opened or closed), once
    a whole check interval has passed with none. So at most once per quiet spell, and never
    while connections come and go (a trim walks the heap: a millisecond better spent on
    traffic)."""

    def __init__(self) -> None:
        self._seen: tuple[int, int] = (0, 0)
        self._trimmed_at: tuple[int, int] = (0, 0)

    def check(self, opened: int, closed: int) -> bool:
        """Called every interval with the running totals; True means trim now."""
        now = (opened, closed)
        quiet = now == self._seen
        self._seen = now
        if quiet and now != self._trimmed_at:
            self._trimmed_at = now
            return True
        return False
