"""The HBONE client connection pool (one per source workload).

Key = (source identity, expected destination identities, destination address, source IP),
as upstream. A new TLS connection is opened only when every live connection for the key
already carries min(100, the peer's max concurrent streams) streams; at most one
connection attempt per key runs at a time, and the others wait for it. Connections idle
for 5 minutes are closed.

Certificate rotation: a connection whose own client certificate or whose peer's
certificate expires within `EXPIRY_MARGIN` (`H2Transport.expires_at`) gets no new stream:
it leaves the pool and drains (GOAWAY; it closes when its open streams have ended), and
the next stream opens a new connection with the current certificate. The streams already
on it keep running past the expiry, as Istio's ztunnel keeps them: TLS checks validity
at the handshake only, and cutting a long-lived connection at every rotation would break
it for nothing its peer did wrong.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from meshcore.hbone.transport import H2Transport
from meshcore.identity.spiffe import SpiffeId

CLIENT_MAX_STREAMS = 100
IDLE_TIMEOUT = 300.0
# No new stream on a connection whose certificates run out sooner than this: a stream may
# still be opening (and the peer checking it) when they do.
EXPIRY_MARGIN = 2.0


@dataclass(frozen=True, slots=True)
class PoolKey:
    src_identity: SpiffeId
    dst_identities: frozenset[SpiffeId]
    dst: tuple[str, int]
    src_ip: str


Connector = Callable[[PoolKey], Awaitable[H2Transport]]


class ConnectionPool:
    def __init__(
        self,
        connect: Connector,
        max_streams: int = CLIENT_MAX_STREAMS,
        idle_timeout: float = IDLE_TIMEOUT,
        expiry_margin: float = EXPIRY_MARGIN,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._connect = connect
        self._expiry_margin = expiry_margin
        self._wall_clock = wall_clock
        self._max_streams = max_streams
        self._idle_timeout = idle_timeout
        self._conns: dict[PoolKey, list[H2Transport]] = {}
        self._connecting: dict[PoolKey, asyncio.Future[None]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.opened = 0  # TLS connections opened over the pool's life (for tests and stats)
        self.retired = 0  # connections drained because their certificates were expiring

    def _capacity(self, h2: H2Transport) -> int:
        return min(self._max_streams, h2.conn.peer_max_concurrent)

    def _pick(self, key: PoolKey) -> H2Transport | None:
        """The first live connection with a free slot (first fit: streams gather on the
        oldest connections, whose frames then share TLS records and wake-ups). The scan
        stops there: a pool that once grew to many connections (a burst of long-lived
        streams) costs a new stream no more than a pool of one, while its surplus stays
        idle until the sweep closes it. Dead and expiring connections met on the way
        leave the pool."""
        conns = self._conns.get(key)
        if not conns:
            return None
        now = self._wall_clock()
        gone: list[H2Transport] = []
        found = None
        for h2 in conns:
            if not h2.usable or self._expiring(h2, now):
                gone.append(h2)
            elif h2.conn.open_streams + h2.reserved < self._capacity(h2):
                found = h2
                break
        if gone:
            self._conns[key] = [c for c in conns if c not in gone]
        return found

    def _expiring(self, h2: H2Transport, now: float) -> bool:
        """Whether `h2`'s certificates run out within the margin of `now` (wall clock); if
        so it is drained (its open streams go on, it takes no new one)."""
        if h2.expires_at is None or h2.expires_at - now > self._expiry_margin:
            return False
        if h2.usable:
            self.retired += 1
            h2.drain("certificate expiring")
        return True

    async def checkout(self, key: PoolKey) -> H2Transport:
        """A connection with a free stream slot, reserved for the caller, who must call
        `open_stream` (which uses the reservation) or `release`."""
        while True:
            h2 = self._pick(key)
            if h2 is not None:
                h2.reserved += 1
                return h2
            pending = self._connecting.get(key)
            if pending is not None:
                await asyncio.shield(pending)
                continue
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._connecting[key] = fut
            try:
                h2 = await self._connect(key)
                if not h2.usable:
                    # Ended as soon as it was made (the server refused us, or broke a limit
                    # at once): dialling again straight away would loop for as long as the
                    # server keeps doing it.
                    why = h2.conn.close_reason or "closed"
                    raise ConnectionError(f"the HBONE connection ended as it opened: {why}")
                if self._expiring(h2, self._wall_clock()):
                    # Dialling again would make another just like it: fail this stream.
                    raise ConnectionError(
                        "the HBONE connection was made with a certificate (ours or the "
                        f"peer's) that expires within {self._expiry_margin:g} s; is the CA "
                        "reachable?"
                    )
            except BaseException as e:
                fut.set_result(None)  # wake waiters: they retry (and report their own error)
                raise e
            finally:
                self._connecting.pop(key, None)
            self.opened += 1
            self._conns.setdefault(key, []).append(h2)
            fut.set_result(None)
            self._arm_sweeper()

    @staticmethod
    def open_stream(
        h2: H2Transport, headers: list[tuple[str, str]], handler: object, data: bytes = b""
    ) -> int:
        h2.reserved -= 1
        return h2.open_stream(headers, handler, data)  # type: ignore[arg-type]

    @staticmethod
    def release(h2: H2Transport) -> None:
        h2.reserved -= 1

    def forget(self, h2: H2Transport) -> None:
        for key, conns in list(self._conns.items()):
            if h2 in conns:
                conns.remove(h2)
                if not conns:
                    del self._conns[key]

    def connections(self) -> list[tuple[PoolKey, H2Transport]]:
        return [(k, c) for k, conns in self._conns.items() for c in conns]

    def _arm_sweeper(self) -> None:
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(min(30.0, self._idle_timeout), self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = time.monotonic()
        for _key, h2 in self.connections():
            idle = h2.conn.open_streams == 0 and h2.reserved == 0
            if not h2.usable or (idle and now - h2.last_active >= self._idle_timeout):
                h2.close(reason="idle")
                self.forget(h2)
        if self._conns:
            self._arm_sweeper()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for _key, h2 in self.connections():
            h2.close(reason="pool closed")
        self._conns.clear()
