"""The tunnel's allocator settings: a TLS read's 256 KiB buffer comes from the heap, not
from a fresh mapping (three system calls and a page fault per read otherwise)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import ctypes, sys
from ztunnel import malloc
if sys.argv[1] == "tuned":
    assert malloc.tune()
buf = bytearray(256 * 1024 + 7)
addr = ctypes.addressof((ctypes.c_char * 1).from_buffer(buf))
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        print("heap" if lo <= addr < hi else "mapping")
        break
else:
    print("mapping")
"""


def where(mode: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_a_tls_read_sized_buffer_comes_from_the_heap_once_tuned() -> None:
    assert where("default") == "mapping"  # glibc's default: a fresh mmap per buffer
    assert where("tuned") == "heap"


def test_idle_trim_waits_for_a_quiet_interval_after_activity() -> None:
    from ztunnel.malloc import IdleTrim

    idle = IdleTrim()
    assert not idle.check(0, 0)  # nothing ever happened: nothing to give back
    assert not idle.check(5, 0)  # busy
    assert not idle.check(9, 3)  # still busy
    assert idle.check(9, 3)  # a whole quiet interval: trim, once
    assert not idle.check(9, 3)
    assert not idle.check(9, 3)
    assert not idle.check(9, 4)  # a connection closed: activity again
    assert idle.check(9, 4)


def test_trim_gives_freed_heap_memory_back() -> None:
    probe = """
import sys
from ztunnel import malloc
malloc.tune()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
# Small objects mixed with big ones: freeing the big ones leaves holes in the heap that
# free() itself does not return (only the top of the heap is trimmed on free).
keep, drop = [], []
for i in range(400):
    drop.append(bytearray(200_000))  # zero-filled: every page is touched
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
