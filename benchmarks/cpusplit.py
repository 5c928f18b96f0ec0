"""CPU time of a process split into user and system, from /proc/<pid>/stat, and per GB moved.

user (utime) is the process's own code: Python, the event loop, OpenSSL's crypto; system
(stime) is the kernel working on its behalf: socket reads and writes, TCP, and on veths
the receive processing of the packets it sends (done in the sender's context). Parsing
and arithmetic are pure; `read_times` is the only I/O. A process that is gone reads as
None, never as zero cost.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
GB = 1e9


@dataclass(frozen=True, slots=True)
class CpuTimes:
    user: float  # seconds
    system: float
    # Minor page faults (fresh memory touched: large buffers allocated and freed), and
    # read/write system calls (libuv moves socket bytes with read/write/writev): counts.
    minflt: int = 0
    syscr: int = 0
    syscw: int = 0

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(
            self.user - other.user,
            self.system - other.system,
            self.minflt - other.minflt,
            self.syscr - other.syscr,
            self.syscw - other.syscw,
        )


def parse_stat_times(text: str, ticks: int = CLK_TCK) -> CpuTimes:
    """utime and stime (fields 14 and 15) and minflt (field 10) of a /proc/<pid>/stat line.
    The command name in parentheses may contain spaces and ')': count from its last ')'."""
    rest = text[text.rindex(")") + 2 :].split()
    return CpuTimes(int(rest[14 - 3]) / ticks, int(rest[15 - 3]) / ticks, int(rest[10 - 3]))


def parse_io_calls(text: str) -> tuple[int, int]:
    """(syscr, syscw) from /proc/<pid>/io."""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return int(fields["syscr"]), int(fields["syscw"])


def read_times(pid: int) -> CpuTimes | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            t = parse_stat_times(f.read())
    except (OSError, ValueError, IndexError):
        return None
    try:  # only the process's owner (or root) may read it: the counts are extra
        with open(f"/proc/{pid}/io", encoding="ascii") as f:
            syscr, syscw = parse_io_calls(f.read())
    except (OSError, ValueError, KeyError):
        return t
    return CpuTimes(t.user, t.system, t.minflt, syscr, syscw)


def sample(pids: Mapping[str, int]) -> dict[str, CpuTimes | None]:
    return {name: read_times(pid) for name, pid in pids.items()}


def per_gb(before: CpuTimes, after: CpuTimes, nbytes: float) -> dict[str, float]:
    """CPU seconds per GB (1e9 bytes) moved between two samples, split and summed; page
    faults and read/write calls per MB (1e6 bytes)."""
    if nbytes <= 0:
        raise ValueError("per_gb: no bytes moved")
    d = after - before
    scale = GB / nbytes
    return {
        "user_s_per_gb": d.user * scale,
        "system_s_per_gb": d.system * scale,
        "total_s_per_gb": (d.user + d.system) * scale,
        "minflt_per_mb": d.minflt * scale / 1000,
        "reads_per_mb": d.syscr * scale / 1000,
        "writes_per_mb": d.syscw * scale / 1000,
    }


def costs(
    before: Mapping[str, CpuTimes | None], after: Mapping[str, CpuTimes | None], nbytes: float
) -> dict[str, dict[str, float]]:
    """Per process named in both samples and alive in both, its CPU per GB."""
    out: dict[str, dict[str, float]] = {}
    for name, b in before.items():
        a = after.get(name)
        if b is not None and a is not None:
            out[name] = per_gb(b, a, nbytes)
    return out
