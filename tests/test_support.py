"""The shared test helpers keep their promises: cleanups run after a failure, builders
override only what they are given."""

from __future__ import annotations

import asyncio

import pytest

from meshcore.state import MeshConfigError
from tests.support.aio import Loop, run, wait_until, wait_until_sync
from tests.support.mesh import DEFAULT_WORKLOAD, mesh_state, serves, service, workload


def test_deferred_cleanups_run_on_the_loop_after_a_failed_scenario() -> None:
    ran: list[str] = []

    async def closes_async() -> None:
        asyncio.get_running_loop()  # on the test's loop, not after it is gone
        ran.append("async")

    loop = Loop()
    loop.defer(lambda: ran.append("sync"))
    loop.defer(closes_async)

    async def fails() -> None:
        raise AssertionError("the test failed")

    with pytest.raises(AssertionError, match="the test failed"):
        loop.run(fails)
    loop.close()
    assert ran == ["async", "sync"]  # last deferred, first run


def test_every_cleanup_runs_and_the_first_error_is_raised() -> None:
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("cleanup bug")

    loop = Loop("uvloop")
    loop.defer(lambda: ran.append("first deferred"))
    loop.defer(broken)
    with pytest.raises(RuntimeError, match="cleanup bug"):
        loop.close()
    assert ran == ["first deferred"]


def test_a_hang_becomes_a_failure() -> None:
    with pytest.raises(TimeoutError):
        run(asyncio.Event().wait, limit=0.01)
    with pytest.raises(AssertionError, match="waiting for nothing"):
        run(wait_until(lambda: False, "nothing", limit=0.01))
    with pytest.raises(AssertionError, match="waiting for never"):
        wait_until_sync(lambda: False, "never", limit=0.01)


def test_builders_override_only_what_they_are_given() -> None:
    a = workload(name="a")
    assert a.uid == "Kubernetes//Pod/default/a" and a.name == "a"
    assert a.identity == DEFAULT_WORKLOAD.identity
    assert workload(uid="x").name == DEFAULT_WORKLOAD.name
    s = service(name="shop", namespace="web")
    assert s.hostname == "shop.web.svc.cluster.local" and s.key == "web/shop.web.svc.cluster.local"
    b = workload(name="b", services=serves((s, {80: 9090})))
    assert b.target_port(s.key, 80) == 9090
    # Two default workloads would claim one uid and one IP: a state refuses them.
    with pytest.raises(MeshConfigError):
        mesh_state([workload(), workload()])


def test_a_free_port_for_a_process_is_outside_the_ephemeral_range_and_bindable() -> None:
    """So no outgoing connection can take it as its source port before the process binds
    it (tests/support/ports.py)."""
    import socket

    from tests.support.ports import LOWEST, ephemeral_low, free_port

    for _ in range(20):
        port = free_port()
        assert LOWEST <= port < ephemeral_low()
        with socket.socket() as s:
            s.bind(("0.0.0.0", port))
