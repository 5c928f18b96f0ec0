"""Fixtures for the travel demo tests; processes are always stopped, also when a test fails."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.demo.apps import AppRunner, Chain, service_env


@pytest.fixture
def runner() -> Iterator[AppRunner]:
    r = AppRunner()
    try:
        yield r
    finally:
        r.close()


def _start_chain(runner: AppRunner) -> Chain:
    pricing = runner.start("pricing", {}, pod="pricing-0", node="node2")
    flights = runner.start(
        "flights", service_env("pricing", pricing), pod="flights-0", node="node2"
    )
    frontend = runner.start("frontend", service_env("flights", flights), pod="frontend-0")
    return Chain(frontend, flights, pricing)


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    """One running chain for the tests of a module that only ask it things (three
    processes started once, not once per test)."""
    r = AppRunner()
    try:
        yield _start_chain(r)
    finally:
        r.close()


@pytest.fixture
def own_chain(runner: AppRunner) -> Chain:
    """A chain of its own, for a test that stops one of its apps."""
    return _start_chain(runner)
