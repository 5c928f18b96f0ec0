"""`within`: a future awaited with one timer (the CONNECT answer's deadline)."""

from __future__ import annotations

import asyncio

import pytest

from ztunnel.proxy.common import within


def test_the_answer_in_time_is_returned_and_its_timer_is_gone() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        loop.call_soon(fut.set_result, 200)
        assert await within(fut, 5.0) == 200
        # the deadline was cancelled: nothing but the loop's own handles remain scheduled
        assert not [h for h in getattr(loop, "_scheduled", []) if not h.cancelled()]

    asyncio.run(main())


def test_no_answer_is_a_timeout_and_the_future_is_failed_not_left_pending() -> None:
    async def main() -> None:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        with pytest.raises(TimeoutError):
            await within(fut, 0.05)
        assert fut.done() and isinstance(fut.exception(), TimeoutError)

    asyncio.run(main())


def test_cancelling_the_waiter_cancels_the_future() -> None:
    async def main() -> None:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(within(fut, 5.0))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fut.cancelled()

    asyncio.run(main())
