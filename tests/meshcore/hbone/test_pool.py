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
