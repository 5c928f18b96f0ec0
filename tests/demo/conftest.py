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


@pytest.fixture
def chain(runner: AppRunner) -> Chain:
    pricing = runner.start("pricing", {}, pod="pricing-0", node="node2")
    flights = runner.start(
        "flights", service_env("pricing", pricing), pod="flights-0", node="node2"
    )
    frontend = runner.start("frontend", service_env("flights", flights), pod="frontend-0")
    return Chain(frontend, flights, pricing)
