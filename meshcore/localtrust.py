"""Who may talk to a node-local unix socket (the ZDS socket, the CA socket), and how often.

A socket file's mode (0600) already keeps other users out, but only as long as nobody
loosens it, hands the file to a container under another uid, or binds a path a hostile
process can reach; the peer's credentials, read from the kernel (SO_PEERCRED) at accept,
are the second line, and they cannot be forged by the peer.

The decisions are pure (`refusal`, `TokenBucket`, `RateLog`); `peer_cred` is the only I/O.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True, slots=True)
class PeerCred:
    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"pid={self.pid} uid={self.uid} gid={self.gid}"


def peer_cred(sock: socket.socket) -> PeerCred:
    """The connected unix peer's credentials as of its connect(). Raises OSError."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid, uid, gid)


def default_uids() -> frozenset[int]:
    """By default only this process's own user may connect (the agent and the tunnel, or
    the CA and the tunnels, run as the same user in every deployment we ship)."""
    return frozenset({os.geteuid()})


def parse_uids(text: str) -> frozenset[int]:
    """`"0,1000"` -> {0, 1000}; an empty text means the default. Raises ValueError."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        return default_uids()
    uids = set()
    for item in items:
        if not item.isdigit() or int(item) > 0xFFFFFFFE:
            raise ValueError(f"{item!r} is not a uid (a number 0..4294967294)")
        uids.add(int(item))
    return frozenset(uids)


def refusal(cred: PeerCred, allowed: Iterable[int]) -> str | None:
    """Why this peer may not connect, or None when it may."""
    allowed = frozenset(allowed)
    if cred.uid in allowed:
        return None
    want = ",".join(str(u) for u in sorted(allowed))
    return f"peer uid {cred.uid} is not an allowed uid ({want}); pid {cred.pid}"


class TokenBucket:
    """`rate` events a second on average, `burst` at once. Time is passed in."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate and burst must be positive")
        self.rate, self.burst = rate_per_s, float(burst)
        self._tokens = float(burst)
        self._at: float | None = None

    def allow(self, now: float) -> bool:
        if self._at is not None:
            # max(): a clock that steps back never takes tokens away.
            self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class RateLog:
    """Whether to log a repeated event now: at most `burst` lines per `interval` seconds,
    each with the number suppressed since the last line, so a flood of refusals cannot
    flood the log while a handful of distinct ones in a moment are all seen."""

    def __init__(self, interval: float = 10.0, burst: int = 1) -> None:
        self.interval = interval
        self.burst = burst
        self._window: float | None = None
        self._written = 0
        self._suppressed = 0

    def due(self, now: float) -> int | None:
        """None: stay quiet; else log now, and the count of events not logged since."""
        if self._window is None or now - self._window >= self.interval:
            self._window, self._written = now, 0
        if self._written >= self.burst:
            self._suppressed += 1
            return None
        self._written += 1
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed
