"""Giving freed heap memory back after a burst: when, and that it works."""

from __future__ import annotations

import subprocess
import sys


def test_a_collection_and_trim_waits_for_a_quiet_interval_after_activity() -> None:
    from meshcore.runtime.malloc import Trim, TrimSchedule

    t = TrimSchedule()
    assert t.check(0, 0) is Trim.NOTHING  # nothing ever happened: nothing to give back
    assert t.check(5, 0) is Trim.NOTHING  # busy
    assert t.check(9, 3) is Trim.NOTHING  # still busy
    assert t.check(9, 3) is Trim.COLLECT_AND_TRIM  # a whole quiet interval: once
    assert t.check(9, 3) is Trim.NOTHING
    assert t.check(9, 3) is Trim.NOTHING
    assert t.check(9, 4) is Trim.NOTHING  # a connection closed: activity again
    assert t.check(9, 4) is Trim.COLLECT_AND_TRIM


def test_no_collection_while_the_process_is_busy_on_open_connections() -> None:
    """Requests over keep-alive connections open and close nothing: CPU time says busy."""
    from meshcore.runtime.malloc import BUSY_CPU_SECONDS, Trim, TrimSchedule

    t = TrimSchedule()
    step = BUSY_CPU_SECONDS * 10
    assert t.check(4, 0, 0.0) is Trim.NOTHING  # connections opened
    assert t.check(4, 0, step) is Trim.NOTHING  # same counts, but busy: no collection
    assert t.check(4, 0, 2 * step) is Trim.NOTHING
    # quiet now: what the load freed is given back, once
    assert t.check(4, 0, 2 * step + BUSY_CPU_SECONDS / 2) is Trim.COLLECT_AND_TRIM
    assert t.check(4, 0, 2 * step + BUSY_CPU_SECONDS) is Trim.NOTHING
    assert t.check(4, 0, 3 * step) is Trim.NOTHING  # a burst on the same connections
    assert t.check(4, 0, 3 * step) is Trim.COLLECT_AND_TRIM  # then quiet


def test_under_steady_load_a_trim_alone_every_interval() -> None:
    """Churn that never pauses: no collection ever (it would stall every connection), but
    the heap's free pages are given back every interval, so they do not pile up."""
    from meshcore.runtime.malloc import Trim, TrimSchedule

    t = TrimSchedule(busy_trim_seconds=30.0)
    seen = []
    for second in range(100):
        seen.append((second, t.check(second * 10, second * 10, 0.0, float(second))))
    assert [s for s, a in seen if a is not Trim.NOTHING] == [30, 60, 90]
    assert {a for _, a in seen} == {Trim.NOTHING, Trim.TRIM}
    # The load stops: one collection, then nothing at all while the node stays idle.
    assert t.check(990, 990, 0.0, 100.0) is Trim.COLLECT_AND_TRIM
    assert [t.check(990, 990, 0.0, 100.0 + s) for s in range(1, 61)] == [Trim.NOTHING] * 60


def test_an_idle_node_is_never_trimmed_on_a_timer() -> None:
    from meshcore.runtime.malloc import Trim, TrimSchedule

    t = TrimSchedule(busy_trim_seconds=5.0)
    assert [t.check(0, 0, 0.0, float(s)) for s in range(60)] == [Trim.NOTHING] * 60


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


def test_a_trim_starts_no_process() -> None:
    """`ctypes.util.find_library` runs `ldconfig -p` in a child on every call; a trim runs
    under load every 30 s in every tunnel, and must not fork the tunnel each time."""
    code = """
import subprocess
from meshcore.runtime import malloc
started = []
real = subprocess.Popen.__init__
def spy(self, *a, **k):
    started.append(a[0] if a else k.get("args"))
    real(self, *a, **k)
subprocess.Popen.__init__ = spy
for _ in range(3):
    malloc.trim()
    malloc.heap()
print(len(started), malloc._libc() is malloc._libc())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "True"], out.stdout + out.stderr
