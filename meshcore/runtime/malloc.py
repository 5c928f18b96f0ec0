"""Giving the C allocator's free memory back to the system after a burst (glibc only;
elsewhere a no-op).

After thousands of connections close, glibc keeps the freed heap pages: `free` returns
only the top of the heap, and live objects scattered through it pin the rest of the
range. `malloc_trim` releases every free page (`collect_and_trim` frees the cyclic garbage
first). `TrimSchedule` decides when: a collection and a trim once the node is quiet after
activity; under steady load a trim alone every `BUSY_TRIM_SECONDS`, since there the free
pages left by each peak of concurrent connections would otherwise stay until the node is
quiet, which under steady churn it never is. `figures` says where the memory is (the
admin's `/memory`).
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import functools
import gc
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once and without `ctypes.util.find_library`, which runs
    `ldconfig -p` in a child process on every call: a fork of the whole tunnel, and the
    event loop waiting for the child, at every trim."""
    try:
        libc = ctypes.CDLL(None)  # the symbols the process has loaded: libc's among them
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def trim() -> bool:
    """Return the heap's free memory to the system; True if any was returned."""
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap() -> dict[str, int]:
    """glibc's heap: bytes in use, free inside the heap (what a trim may give back), and in
    mmapped chunks, over all its arenas; empty where glibc (>= 2.33) is not the allocator."""
    libc = _libc()
    fn = getattr(libc, "mallinfo2", None) if libc is not None else None
    if fn is None:
        return {}
    fn.restype = _MallInfo2
    m = fn()
    return {"heap_in_use": m.uordblks, "heap_free": m.fordblks, "mmapped": m.hblkhd}


_ARENAS = re.compile(r"^# arenas (allocated current|highwater mark)\s*=\s*([\d,]+)", re.M)


def parse_pymalloc_stats(text: str) -> dict[str, int]:
    """`sys._debugmallocstats()`'s arena lines: arenas held now and the most ever held."""
    out = {}
    for name, value in _ARENAS.findall(text):
        key = "arenas" if name == "allocated current" else "arenas_highwater"
        out[key] = int(value.replace(",", ""))
    return out


def pymalloc_arenas() -> dict[str, int]:
    """pymalloc's arenas (1 MiB each, where Python's small objects live): held now and the
    most ever held. `_debugmallocstats` writes to the C stderr, so fd 2 points at a
    temporary file for the call; anything else written to stderr meanwhile lands there too
    (the call is synchronous: on an event loop nothing else of the loop's writes). Empty
    while tracemalloc traces (pymalloc is then behind its hooks and reports nothing)."""
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        return parse_pymalloc_stats(tmp.read().decode(errors="replace"))


def status_bytes(*fields: str) -> list[int | None]:
    """This process's `/proc/self/status` memory fields (`VmRSS`, `VmHWM`, ...) in bytes,
    in the order asked; None for a field not there (or no /proc)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        lines = []
    found = {}
    for line in lines:
        name, _, rest = line.partition(":")
        if name in fields:
            found[name] = int(rest.split()[0]) * 1024
    return [found.get(f) for f in fields]


def figures() -> dict[str, int | None]:
    """Where this process's memory is, for the admin's `/memory` (as Envoy's): resident
    and its high mark, Python's allocated blocks and pymalloc's arenas, glibc's heap in use
    and free. A resident size that rises while the blocks and the heap in use stay flat is
    memory the allocators keep (free heap not yet trimmed, arenas pinned by a few live
    objects), not objects that pile up."""
    rss, high = status_bytes("VmRSS", "VmHWM")
    return {
        "rss_bytes": rss,
        "rss_high_bytes": high,
        "python_blocks": sys.getallocatedblocks(),
        **pymalloc_arenas(),
        **heap(),
    }


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

# Under load, a trim alone (no collection) this often. A trim walks the heap's free chunks:
# 3-4 ms for a 100 MB process with 3 000 connections held (`memgrowth.py --trim`), one
# pause per interval, far below any percentile a request sees. Envoy releases its free
# memory at an interval for the same reason (`memory_allocator_manager`).
BUSY_TRIM_SECONDS = 30.0

# How often the loop looks at the process's activity.
TRIM_CHECK_SECONDS = 1.0


class Trim(enum.Enum):
    NOTHING = "nothing"
    TRIM = "trim"  # under load: give back free pages, leave the collector alone
    COLLECT_AND_TRIM = "collect and trim"  # quiet: free the cyclic garbage too


class TrimSchedule:
    """When to give freed memory back. After activity, once a whole check interval has
    passed with none: a full collection and a trim. Activity is connections opened or
    closed, or the process's CPU time (requests over connections that stay open change no
    count, and a full collection in the middle of them stalled every one for tens of
    milliseconds: p99 at 1000 rps over keep-alive connections went from 9 ms to 31 ms).
    While activity goes on, a trim alone every `BUSY_TRIM_SECONDS`: it does not walk the
    objects, and the heap's free pages would otherwise only ever grow with the peaks."""

    def __init__(self, busy_trim_seconds: float = BUSY_TRIM_SECONDS) -> None:
        self._busy_trim_seconds = busy_trim_seconds
        self._seen: tuple[int, int] = (0, 0)
        self._trimmed_at: tuple[int, int] = (0, 0)
        self._cpu = 0.0
        self._busy_since_trim = False
        self._last_trim: float | None = None

    def check(self, opened: int, closed: int, cpu: float = 0.0, now: float = 0.0) -> Trim:
        """Called every interval with the running totals, the process's CPU seconds
        (`time.process_time()`) and a monotonic clock."""
        counts = (opened, closed)
        busy = cpu - self._cpu > BUSY_CPU_SECONDS
        self._cpu = cpu
        quiet = counts == self._seen and not busy
        self._seen = counts
        if busy:
            self._busy_since_trim = True
        active = counts != self._trimmed_at or self._busy_since_trim
        if self._last_trim is None:
            self._last_trim = now  # the interval under load counts from the first look
        if quiet and active:
            self._trimmed_at = counts
            self._busy_since_trim = False
            self._last_trim = now
            return Trim.COLLECT_AND_TRIM
        if active and now - self._last_trim >= self._busy_trim_seconds:
            self._last_trim = now
            return Trim.TRIM
        return Trim.NOTHING


async def trim_loop(
    activity: Callable[[], tuple[int, int]], interval: float = TRIM_CHECK_SECONDS
) -> None:
    """Every interval, ask the schedule and do what it says (a tunnel and each of its
    workers run one; `activity` gives the connections opened and closed so far)."""
    schedule = TrimSchedule()
    while True:
        await asyncio.sleep(interval)
        action = schedule.check(*activity(), time.process_time(), time.monotonic())
        if action is Trim.NOTHING:
            continue
        started = time.perf_counter()
        if action is Trim.COLLECT_AND_TRIM:
            collect_and_trim()
        else:
            trim()
        log.debug(
            "memory given back",
            how=action.value,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
