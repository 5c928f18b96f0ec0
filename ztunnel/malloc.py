"""The C allocator's settings for the tunnel process (glibc only; elsewhere a no-op).

Every TLS read asks for a 256 KiB buffer (the TLS transport's read size) and shrinks it to
what arrived. glibc serves requests above its mmap threshold (128 KiB at start) with a
fresh mapping, so each read cost an mmap, an mremap, a munmap and a page fault: three
system calls per request on each tunnel, a third of all the tunnel's system calls under a
request/response load. Above the largest such buffer, they come from the heap and are
reused. The trim threshold keeps that much free memory at the top of the heap instead of
returning and re-asking for it on every burst; `trim` gives it back when the node is quiet
(`IdleTrim` decides when: never under load, where it would only cost time).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1024 * 1024
TRIM_THRESHOLD = 4 * 1024 * 1024


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - glibc only: musl has no mallopt
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def tune() -> bool:
    """Apply the thresholds; False where the allocator is not glibc's."""
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok)


def trim() -> bool:
    """Return the heap's free memory to the system; True if any was returned."""
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))


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
