"""The HBONE client pool's dialling, against connections made by a stand-in connector."""

from __future__ import annotations

import asyncio

import pytest

from meshcore.hbone.h2frames import ErrorCode
from meshcore.hbone.pool import ConnectionPool, PoolKey
from meshcore.hbone.transport import H2Transport
from meshcore.identity.spiffe import SpiffeId
from tests.support.aio import run

KEY = PoolKey(
    SpiffeId("cluster.local", "shop", "client"),
    frozenset({SpiffeId("cluster.local", "shop", "web")}),
    ("10.244.2.20", 15008),
    "10.244.1.10",
)


@pytest.mark.parametrize("how", ["ended by us", "GOAWAY from the server"])
def test_a_connection_that_ends_as_it_opens_fails_the_checkout_and_is_not_redialled(how: str):
    """A server that ends every connection at once (a hostile one flooding it past a limit,
    or one that answers each with GOAWAY) fails the caller's checkout; the pool used to
    dial again straight away, for as long as the server kept doing it."""

    async def main() -> int:
        dialled = 0

        async def connect(_key: PoolKey) -> H2Transport:
            nonlocal dialled
            dialled += 1
            await asyncio.sleep(0)  # as a real dial, it lets the loop run
            h2 = H2Transport(client=True, keepalive=False)
            if how == "ended by us":
                h2.conn.close(ErrorCode.ENHANCE_YOUR_CALM, "10 frames in a row carry nothing")
            else:
                h2.conn.goaway_received = True
            return h2

        pool = ConnectionPool(connect)
        with pytest.raises(ConnectionError, match="ended as it opened"):
            await asyncio.wait_for(pool.checkout(KEY), 5)
        assert pool.connections() == []
        return dialled

    assert run(main) == 1


class _Sink:
    """A stand-in transport that takes what the connection writes (no socket is needed
    for the pool's choice; the real TLS path is covered by the end-to-end rotation test)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def writelines(self, data: list[bytes]) -> None:
        self.written.extend(bytes(d) for d in data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, _name: str, default: object = None) -> object:
        return default


def test_a_connection_whose_certificate_is_expiring_gets_no_new_stream_and_drains():
    async def main() -> None:
        now = [1000.0]
        made: list[H2Transport] = []

        async def connect(_key: PoolKey) -> H2Transport:
            h2 = H2Transport(client=True, keepalive=False)
            h2.transport = _Sink()  # type: ignore[assignment]
            h2.expires_at = now[0] + 60.0
            made.append(h2)
            return h2

        pool = ConnectionPool(connect, expiry_margin=2.0, wall_clock=lambda: now[0])
        first = await pool.checkout(KEY)
        pool.release(first)
        now[0] += 57.0  # 3 s left: still used
        assert await pool.checkout(KEY) is first
        pool.release(first)
        now[0] += 1.5  # 1.5 s left: retired, a new connection takes the stream
        second = await pool.checkout(KEY)
        assert second is not first and pool.opened == 2 and pool.retired == 1
        assert first.conn.draining and not first.conn.closed  # GOAWAY; open streams go on
        assert [h2 for _k, h2 in pool.connections()] == [second]
        pool.close()

    run(main)


def test_a_new_connection_already_expiring_fails_the_checkout_without_redialling():
    async def main() -> int:
        async def connect(_key: PoolKey) -> H2Transport:
            h2 = H2Transport(client=True, keepalive=False)
            h2.transport = _Sink()  # type: ignore[assignment]
            h2.expires_at = 1001.0  # the CA is away and the certificate about to expire
            return h2

        pool = ConnectionPool(connect, expiry_margin=2.0, wall_clock=lambda: 1000.0)
        with pytest.raises(ConnectionError, match="expires within 2 s"):
            await asyncio.wait_for(pool.checkout(KEY), 5)
        assert pool.connections() == []
        return pool.opened

    assert run(main) == 0


class _Counted(H2Transport):
    """An H2Transport that counts how often the pool asks whether it is usable."""

    asked = 0

    @property
    def usable(self) -> bool:
        _Counted.asked += 1
        return super().usable


def _filled_pool(count: int) -> tuple[ConnectionPool, list[H2Transport]]:
    """A pool of one stream per connection whose `count` connections each hold a
    reservation (checkouts not yet released)."""
    made: list[H2Transport] = []

    async def connect(_key: PoolKey) -> H2Transport:
        h2 = _Counted(client=True, keepalive=False)
        h2.transport = _Sink()  # type: ignore[assignment]
        made.append(h2)
        return h2

    return ConnectionPool(connect, max_streams=1), made


def test_a_checkout_from_a_grown_pool_looks_no_further_than_the_first_connection_with_room():
    """A pool that once grew (a burst of held connections made it dial 50) costs a new
    stream what a pool of one does: the oldest connection with room takes it, and the
    connections behind it are not looked at. It used to check every connection on every
    checkout, which made each new connection through a tunnel dearer after a burst."""

    async def main() -> None:
        pool, made = _filled_pool(50)
        for _ in range(50):
            await pool.checkout(KEY)
        assert pool.opened == 50
        pool.release(made[0])
        pool.release(made[7])
        _Counted.asked = 0
        assert await pool.checkout(KEY) is made[0]
        assert _Counted.asked == 1
        _Counted.asked = 0
        assert await pool.checkout(KEY) is made[7]  # first fit, not the newest
        assert _Counted.asked == 8
        pool.close()

    run(main)


def test_connections_that_ended_leave_the_pool_when_a_checkout_meets_them():
    async def main() -> None:
        pool, made = _filled_pool(4)
        for _ in range(4):
            await pool.checkout(KEY)
        made[1].conn.goaway_received = True  # the server is going away
        made[2].conn.close(ErrorCode.NO_ERROR, "closed")
        pool.release(made[3])
        assert await pool.checkout(KEY) is made[3]
        assert [h2 for _k, h2 in pool.connections()] == [made[0], made[3]]
        pool.close()

    run(main)
