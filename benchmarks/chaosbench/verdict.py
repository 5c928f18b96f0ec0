"""The pure decisions of a chaos event: what the load saw (outage, recovery time, long-lived
connections lost), whether anything failed open, and whether anything was left stale.

Times are wall-clock seconds (time.time()), the load's and the benchmark's alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PATHS = ("l4", "l7")
TUNNEL_PORTS = (15001, 15006, 15008)
NOT_MADE = "not made"  # an attempt the load skipped (too many in flight): no answer of the mesh


@dataclass(frozen=True, slots=True)
class Attempt:
    """One new connection of the load: when it began and ended, and whether it worked."""

    began: float
    ended: float
    ok: bool
    error: str | None = None

    @staticmethod
    def from_row(row: Sequence[Any]) -> Attempt:
        return Attempt(float(row[0]), float(row[1]), bool(row[2]), row[3])


@dataclass(frozen=True, slots=True)
class Expect:
    """What a crash of one kind of target may do to the load, by path.

    `outage`: paths whose new connections may fail while it is down; `lose`: paths whose
    long-lived connections it may break; `closed`: paths that must fail while it is down
    (their traffic passes through it: a success then went around it)."""

    outage: frozenset[str] = frozenset()
    lose: frozenset[str] = frozenset()
    closed: frozenset[str] = frozenset()


_BOTH = frozenset(PATHS)
_L7 = frozenset({"l7"})
# A tunnel carries every path of its node's pods (the waypoint sits on node1 with the
# client, so node2's tunnel carries the waypoint's leg to the server too); the waypoint
# only the L7 path. The node agent, the CA and the control plane are on no data path:
# their crash must cost no request and no connection.
EXPECTED: Mapping[str, Expect] = {
    "tunnel": Expect(_BOTH, _BOTH, _BOTH),
    "agent": Expect(),
    "ca": Expect(),
    "controlplane": Expect(),
    "waypoint": Expect(_L7, _L7, _L7),
}


@dataclass(frozen=True, slots=True)
class Outage:
    """The load on one path around a crash at `killed_at`."""

    attempted: int  # new connections that ended after the kill
    failed: int
    recovery_s: float | None  # 0.0: none failed; None: none worked after the last failure
    first_error: str | None = None


def outage(attempts: Sequence[Attempt], killed_at: float) -> Outage:
    """Attempts that ended after the kill count (one begun just before it may have died
    with it). The recovery time is from the kill to the first attempt that worked after
    the last one that failed: a failed attempt may have waited for its timeout, so its own
    time says too little, and a lone success in the middle of an outage is not a recovery.
    Attempts the load did not make (NOT_MADE) are left out."""
    window = [
        a for a in attempts if a.ended >= killed_at and not (a.error or "").startswith(NOT_MADE)
    ]
    failures = [a for a in window if not a.ok]
    if not failures:
        return Outage(len(window), 0, 0.0)
    last = max(a.began for a in failures)
    back = [a.began for a in window if a.ok and a.began > last]
    recovery = round(min(back) - killed_at, 3) if back else None
    first_error = min(failures, key=lambda a: a.began).error
    return Outage(len(window), len(failures), recovery, first_error)


def worked_while_down(attempts: Sequence[Attempt], down_from: float, down_until: float) -> int:
    """Attempts that began and ended while the target was dead and worked: on a path that
    crosses the target, each one went around it (failed open)."""
    return sum(1 for a in attempts if a.ok and a.began >= down_from and a.ended <= down_until)


def long_lost(longs: Sequence[Mapping[str, Any]]) -> int:
    return sum(1 for x in longs if not x.get("ok"))


def rules_changed(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """One line per pod whose capture rules differ (missing, added, or duplicated)."""
    out = []
    for pod in sorted(set(before) | set(after)):
        b, a = before.get(pod), after.get(pod)
        if b == a:
            continue
        if a is None:
            out.append(f"{pod}: rules unreadable")
            continue
        if b is None:
            out.append(f"{pod}: no rules before")
            continue
        old, new = b.splitlines(), a.splitlines()
        gone = [x for x in old if x not in new]
        added = [x for x in new if x not in old]
        dup = len(new) - len(set(new)) - (len(old) - len(set(old)))
        parts = []
        if gone:
            parts.append(f"{len(gone)} lines gone (e.g. {gone[0]!r})")
        if added:
            parts.append(f"{len(added)} lines added (e.g. {added[0]!r})")
        if dup > 0:
            parts.append(f"{dup} duplicated lines")
        out.append(f"{pod}: " + ("; ".join(parts) or "rules reordered"))
    return out


def listener_problems(listeners: Mapping[str, Mapping[int, int]]) -> list[str]:
    """Each pod netns must hold each tunnel port's listener exactly once (twice: the old
    tunnel's is still there; none: the pod is not served)."""
    out = []
    for pod, ports in sorted(listeners.items()):
        for port in TUNNEL_PORTS:
            n = ports.get(port, 0)
            if n != 1:
                out.append(f"{pod}: {n} listeners on {port}")
    return out


def netns_fd_problems(
    before: Mapping[str, int], after: Mapping[str, int], pods: Mapping[str, int]
) -> list[str]:
    """A node's tunnel holds one netns fd per pod it serves: as many after the event as
    before, and never more than its pods."""
    out = []
    for node in sorted(after):
        n = after[node]
        if n != before.get(node):
            out.append(f"{node}: tunnel holds {n} netns fds, {before.get(node)} before")
        elif n > pods.get(node, 0):
            out.append(f"{node}: tunnel holds {n} netns fds for {pods.get(node, 0)} pods")
    return out


@dataclass(frozen=True, slots=True)
class Findings:
    """Everything an event must not show, each a list of lines saying where."""

    plaintext: list[str] = field(default_factory=list)
    bypass: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # a loss the target cannot explain

    def clean(self) -> bool:
        return not (self.plaintext or self.bypass or self.stale or self.unexpected)


def unexpected(kind: str, outages: Mapping[str, Outage], lost: Mapping[str, int]) -> list[str]:
    """Failures and losses on paths the crashed target is not on."""
    expect = EXPECTED[kind]
    out = []
    for path in PATHS:
        o = outages.get(path)
        if o is not None and o.failed and path not in expect.outage:
            out.append(f"{path}: {o.failed} new connections failed ({o.first_error})")
        if lost.get(path) and path not in expect.lose:
            out.append(f"{path}: {lost[path]} long-lived connections lost")
        if o is not None and o.recovery_s is None:
            out.append(f"{path}: no new connection worked after the last failure")
    return out


def summary(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(median, max) of the recovery times, None when there are none."""
    if not values:
        return None, None
    return round(statistics.median(values), 3), round(max(values), 3)
