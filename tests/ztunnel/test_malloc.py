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
