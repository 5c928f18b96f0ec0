"""Test tiers: pure and in-process tests run anywhere; `netns` tests need root.

Under CI (CI=true) a netns test that cannot run is a failure, never a silent skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.aio import Loop


def _netns_unavailable() -> str:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/proc/self/ns/net"):
        return "no network namespace support"
    return ""


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "netns" not in item.keywords:
        return
    why = _netns_unavailable()
    if not why:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"netns tier must run under CI but cannot: {why}")
    pytest.skip(f"netns tier: {why}")


@pytest.fixture
def aio(request: pytest.FixtureRequest) -> Iterator[Loop]:
    """One event loop for the test. What the test `defer`s (or registers with `closing`)
    is cleaned up on that loop when the test ends, whether it passed or failed.
    Parametrize indirectly with a loop name from `tests.support.aio.LOOPS` to choose it."""
    loop = Loop(getattr(request, "param", "asyncio"))
    yield loop
    loop.close()
