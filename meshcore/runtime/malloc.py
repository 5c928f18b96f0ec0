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


# CPU time the process may use in one check interval and still count as quiet: keepalive
# PINGs and the readiness probe cost far less; traffic over long-lived connections (which
# open and close nothing) costs far more.
BUSY_CPU_SECONDS = 0.02


class IdleTrim:
    """When to give freed memory back: after activity, once a whole check interval has
    passed with none. Activity is connections opened or closed, or the process's CPU time
    (requests over connections that stay open change no count, and a full collection in
    the middle of them stalled every one for tens of milliseconds: p99 at 1000 rps over
    keep-alive connections went from 9 ms to 31 ms). So at most once per quiet spell, and
    never under load (a trim walks the heap)."""

    def __init__(self) -> None:
        self._seen: tuple[int, int] = (0, 0)
        self._trimmed_at: tuple[int, int] = (0, 0)
        self._cpu = 0.0
        self._busy_since_trim = False

    def check(self, opened: int, closed: int, cpu: float = 0.0) -> bool:
        """Called every interval with the running totals and the process's CPU seconds
        (`time.process_time()`); True means trim now."""
        now = (opened, closed)
        busy = cpu - self._cpu > BUSY_CPU_SECONDS
        self._cpu = cpu
        quiet = now == self._seen and not busy
        self._seen = now
        if busy:
            self._busy_since_trim = True
        if quiet and (now != self._trimmed_at or self._busy_since_trim):
            self._trimmed_at = now
            self._busy_since_trim = False
            return True
        return False
