"""The kernel's own TCP counters of one network namespace, to tell where a soak's slow or
failed connections were lost: a SYN dropped at a full accept queue (ListenOverflows,
ListenDrops), a handshake or segment retransmitted (TCPSynRetrans, RetransSegs), a reset.

A connection answered after more than 10 s with a path otherwise under a second is the
shape of SYN retransmissions (1, 3, 7, 15 s): these counters say whether they happened, and
in which namespace (the client pod's, where the generator connects and the client tunnel
accepts; the server pod's, where the server tunnel connects to the app; a node's).

`/proc/<pid>/net/{snmp,netstat}` are the counters of the namespace `pid` is in, so no
namespace is entered. `/proc/net/softnet_stat` is the machine's: packets a CPU's backlog
dropped (veths deliver through it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

# (section, counter): what each says, for the report.
COUNTERS: dict[tuple[str, str], str] = {
    ("TcpExt", "ListenOverflows"): "a listener's accept queue was full",
    ("TcpExt", "ListenDrops"): "SYNs or handshake ACKs a listener dropped (overflows included)",
    ("TcpExt", "TCPReqQFullDrop"): "SYNs dropped: the SYN queue was full",
    ("TcpExt", "TCPBacklogDrop"): "segments dropped: a socket's backlog was full",
    ("TcpExt", "TCPSynRetrans"): "SYN and SYN-ACK retransmissions",
    ("TcpExt", "TCPTimeouts"): "retransmission timer expiries",
    ("Tcp", "RetransSegs"): "segments retransmitted",
    ("Tcp", "AttemptFails"): "connects that failed",
    ("Tcp", "EstabResets"): "established connections reset",
    ("Tcp", "OutRsts"): "resets sent",
}


def parse(*texts: str) -> dict[str, int]:
    """`Section: name name ...` / `Section: value value ...` line pairs (the format of
    /proc/net/snmp and /proc/net/netstat) -> {"Section.name": value} for COUNTERS. A
    malformed pair is skipped, never guessed."""
    wanted = {f"{s}.{n}" for s, n in COUNTERS}
    out: dict[str, int] = {}
    for text in texts:
        lines = text.splitlines()
        for head, values in zip(lines[::2], lines[1::2], strict=False):
            hs, _, names = head.partition(":")
            vs, _, nums = values.partition(":")
            if hs != vs or not hs:
                continue
            for name, num in zip(names.split(), nums.split(), strict=False):
                key = f"{hs}.{name}"
                if key in wanted:
                    try:
                        out[key] = int(num)
                    except ValueError:
                        continue
    return out


def read(pid: int, proc: Path = Path("/proc")) -> dict[str, int] | None:
    """The counters of the namespace `pid` is in; None when it cannot be read (gone)."""
    try:
        return parse(
            (proc / str(pid) / "net" / "snmp").read_text(encoding="ascii"),
            (proc / str(pid) / "net" / "netstat").read_text(encoding="ascii"),
        )
    except (OSError, UnicodeDecodeError):
        return None


def softnet_dropped(text: str) -> int | None:
    """Packets the CPUs' input backlogs dropped (/proc/net/softnet_stat: per CPU, the second
    hex column), summed; None when unreadable."""
    total = 0
    try:
        for line in text.splitlines():
            cols = line.split()
            if len(cols) >= 2:
                total += int(cols[1], 16)
    except ValueError:
        return None
    return total


def read_softnet_dropped(path: Path = Path("/proc/net/softnet_stat")) -> int | None:
    try:
        return softnet_dropped(path.read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError):
        return None


def delta(before: Mapping[str, int] | None, after: Mapping[str, int] | None) -> dict[str, int]:
    """What each counter gained between two readings (only counters in both)."""
    if before is None or after is None:
        return {}
    return {k: after[k] - before[k] for k in after if k in before}
