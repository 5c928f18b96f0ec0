"""Test tiers: pure and in-process tests run anywhere; `netns` tests need root.

Under CI (CI=true) a netns test that cannot run is a failure, never a silent skip.
"""

from __future__ import annotations

import os

import pytest


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
