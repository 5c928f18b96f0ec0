"""What a scenario's proxies cost, from /proc: CPU seconds (utime + stime, all threads) and
resident memory (VmRSS) per process, summed per role. Parsing and arithmetic are pure;
`sample` is the only I/O.

A process that is gone reads as None: a scenario whose proxy died shows up as missing
figures, not as zero cost.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Usage:
    cpu_s: float
    rss_kb: int


def parse_stat_cpu(text: str, ticks: int = CLK_TCK) -> float:
    """utime + stime in seconds from /proc/<pid>/stat (fields 14 and 15; the command
    name in parentheses may contain spaces, so count from its closing parenthesis)."""
    rest = text[text.rindex(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / ticks


def parse_status_rss(text: str) -> int:
    """VmRSS in kB from /proc/<pid>/status."""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError("no VmRSS line (a kernel thread or a zombie?)")


def sample_pid(pid: int) -> Usage | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            cpu = parse_stat_cpu(f.read())
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            rss = parse_status_rss(f.read())
    except (OSError, ValueError):
        return None
    return Usage(cpu, rss)


def sample(proxies: dict[str, list[int]]) -> dict[str, Usage | None]:
    """Per role, the sum over its pids; None if any of them is gone."""
    out: dict[str, Usage | None] = {}
    for role, pids in proxies.items():
        got = [sample_pid(p) for p in pids]
        if any(u is None for u in got):
            out[role] = None
            continue
        out[role] = Usage(sum(u.cpu_s for u in got if u), sum(u.rss_kb for u in got if u))
    return out


def sample_each(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each pid still running (a gone one is left out)."""
    out: dict[int, float] = {}
    for pid in pids:
        u = sample_pid(pid)
        if u is not None:
            out[pid] = u.cpu_s
    return out


def cpu_delta(before: Mapping[int, float], after: Mapping[int, float]) -> float:
    """CPU seconds spent between two `sample_each`, over the pids present in both."""
    return sum(max(0.0, after[p] - before[p]) for p in before if p in after)


def load_costs(
    before: Mapping[str, Usage | None], after: Mapping[str, Usage | None], requests: int
) -> dict[str, dict[str, float | None]]:
    """Per role and in total: CPU seconds spent, per 1000 requests, and RSS after."""
    out: dict[str, dict[str, float | None]] = {}
    cpu_total = 0.0
    rss_total = 0
    complete = True
    for role in before:
        b, a = before[role], after.get(role)
        if b is None or a is None:
            out[role] = {"cpu_s": None, "cpu_s_per_1000_req": None, "rss_kb": None}
            complete = False
            continue
        cpu = max(0.0, a.cpu_s - b.cpu_s)
        cpu_total += cpu
        rss_total += a.rss_kb
        out[role] = {
            "cpu_s": cpu,
            "cpu_s_per_1000_req": cpu * 1000.0 / requests if requests else None,
            "rss_kb": float(a.rss_kb),
        }
    out["total"] = {
        "cpu_s": cpu_total if complete else None,
        "cpu_s_per_1000_req": cpu_total * 1000.0 / requests if complete and requests else None,
        "rss_kb": float(rss_total) if complete else None,
    }
    return out


def rss_total_kb(usage: Mapping[str, Usage | None]) -> int | None:
    if any(u is None for u in usage.values()):
        return None
    return sum(u.rss_kb for u in usage.values() if u)


def bytes_per_connection(before_kb: int | None, after_kb: int | None, opened: int) -> float | None:
    """RSS growth per open connection, summed over the scenario's proxies."""
    if before_kb is None or after_kb is None or opened <= 0:
        return None
    return (after_kb - before_kb) * 1024.0 / opened


def parse_tcp_passive_opens(snmp: str) -> int:
    """PassiveOpens (connections accepted) from /proc/<pid>/net/snmp: the `Tcp:` header
    line names the fields, the next `Tcp:` line holds their values."""
    rows = [line.split()[1:] for line in snmp.splitlines() if line.startswith("Tcp:")]
    if len(rows) < 2 or "PassiveOpens" not in rows[0]:
        raise ValueError("no Tcp PassiveOpens in /proc/net/snmp")
    return int(rows[1][rows[0].index("PassiveOpens")])


def passive_opens(pid: int) -> int | None:
    """Connections accepted so far in the network namespace of `pid` (the kernel counts per
    namespace); None if the process is gone."""
    try:
        with open(f"/proc/{pid}/net/snmp", encoding="ascii") as f:
            return parse_tcp_passive_opens(f.read())
    except (FileNotFoundError, ProcessLookupError):
        return None
