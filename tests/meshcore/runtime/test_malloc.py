"""Giving freed heap memory back after a burst: when, and that it works."""

from __future__ import annotations

import subprocess
import sys


def test_idle_trim_waits_for_a_quiet_interval_after_activity() -> None:
    from meshcore.runtime.malloc import IdleTrim

    idle = IdleTrim()
    assert not idle.check(0, 0)  # nothing ever happened: nothing to give back
    assert not idle.check(5, 0)  # busy
    assert not idle.check(9, 3)  # still busy
    assert idle.check(9, 3)  # a whole quiet interval: trim, once
    assert not idle.check(9, 3)
    assert not idle.check(9, 3)
    assert not idle.check(9, 4)  # a connection closed: activity again
    assert idle.check(9, 4)


def test_idle_trim_waits_while_the_process_is_busy_on_open_connections() -> None:
    """Requests over keep-alive connections open and close nothing: CPU time says busy."""
    from meshcore.runtime.malloc import BUSY_CPU_SECONDS, IdleTrim

    idle = IdleTrim()
    step = BUSY_CPU_SECONDS * 10
    assert not idle.check(4, 0, 0.0)  # connections opened
    assert not idle.check(4, 0, step)  # same counts, but busy: no trim under load
    assert not idle.check(4, 0, 2 * step)
    assert idle.check(4, 0, 2 * step + BUSY_CPU_SECONDS / 2)  # quiet now: trim, once
    assert not idle.check(4, 0, 2 * step + BUSY_CPU_SECONDS)
    assert not idle.check(4, 0, 3 * step)  # a burst on the same connections
    assert idle.check(4, 0, 3 * step)  # then quiet: what the burst freed is given back


def test_trim_gives_freed_heap_memory_back() -> None:
    probe = """
import sys
from meshcore.runtime import malloc
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
# Small objects mixed with big ones: freeing the big ones leaves holes in the heap that
# free() itself does not return (only the top of the heap is trimmed on free).
keep, drop = [], []
for i in range(800):
    # Below glibc's mmap threshold (128 KiB), so on the heap; zero-filled: pages touched.
    drop.append(bytearray(100_000))
    keep.append(bytearray(600))
before = rss()
del drop
after_free = rss()
assert malloc.trim()
after_trim = rss()
print(before, after_free, after_trim)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    before, after_free, after_trim = (int(x) for x in out.stdout.split())
    assert after_free > before // 2  # free() alone kept most of it
    assert after_trim < after_free - 40_000_000  # trim returned the holes (80 MB freed)


def test_collect_and_trim_gives_back_what_cyclic_garbage_held() -> None:
    """Objects that refer to each other (a connection's protocol and transport) are freed
    only by the cyclic collector; with it idle, trim alone gives nothing of theirs back."""
    probe = """
import gc
from meshcore.runtime import malloc
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
class Conn:
    def __init__(self):
        self.buf = bytearray(100_000)  # below the mmap threshold: on the heap
        self.peer = self  # a cycle, as a protocol and its transport
gc.disable()  # as on a quiet node: nothing allocates, the collector does not run
keep = []
for i in range(800):
    Conn()
    keep.append(bytearray(600))
before = rss()
malloc.trim()
after_trim = rss()
malloc.collect_and_trim()
after_collect = rss()
print(before, after_trim, after_collect)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    before, after_trim, after_collect = (int(x) for x in out.stdout.split())
    assert after_trim > before - 10_000_000  # the garbage still held its 80 MB
    assert after_collect < after_trim - 40_000_000
