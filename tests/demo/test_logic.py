"""Pure tests of the travel apps' decisions: prices, routes, discovery, error mapping."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flights
import frontend
import pricing
import pytest
from travel_common import (
    ConfigError,
    DownstreamError,
    PodIdentity,
    Request,
    ServiceAddress,
    dispatch,
)

ME = PodIdentity(name="p-0", namespace="travel", ip="10.244.1.10", node="node1")
SVC = ServiceAddress("svc", "127.0.0.1", 1)


def req(path: str, **query: str) -> Request:
    return Request(path=path, query=query, client_ip="10.244.2.10")


def test_quote_is_deterministic_and_in_range() -> None:
    prices = {code: pricing.quote_cents(code) for code in ("KL100", "TP200", "HV3333", "U29")}
    assert prices == {code: pricing.quote_cents(code) for code in prices}
    assert all(
        pricing.MIN_CENTS <= p < pricing.MIN_CENTS + pricing.SPREAD_CENTS for p in prices.values()
    )
    assert len(set(prices.values())) > 1  # the hash spreads prices, not a constant


def test_quote_endpoint_reports_price_and_hop() -> None:
    resp = dispatch(pricing.routes(ME), req("/quote", flight="kl100"))
    assert resp.status == 200
    assert resp.body["flight"] == "KL100"
    assert resp.body["price"] == pricing.quote_cents("KL100") / 100
    assert resp.body["seen_client"] == "10.244.2.10"
    assert resp.body["hop"]["service"] == "pricing"
    assert resp.body["hop"]["served_by"] == "p-0"


@pytest.mark.parametrize("query", [{}, {"flight": "X"}, {"flight": "KL 1"}, {"flight": "KL12345"}])
def test_quote_rejects_bad_flight_codes(query: dict[str, str]) -> None:
    resp = dispatch(pricing.routes(ME), req("/quote", **query))
    assert resp.status == 400
    assert "flight" in resp.body["error"]


def test_flights_on_route_are_distinct_and_stable() -> None:
    codes = flights.flights_on("AMS", "LIS")
    assert codes == flights.flights_on("AMS", "LIS")
    assert len(codes) == len(set(codes)) == flights.FLIGHTS_PER_ROUTE
    assert codes != flights.flights_on("LIS", "AMS")
    assert all(pricing.FLIGHT_CODE.match(c) for c in codes)  # pricing accepts every code


def fake_pricing(svc: ServiceAddress, path: str, query: Mapping[str, str]) -> dict[str, Any]:
    return dispatch(pricing.routes(ME), req(path, **query)).body  # type: ignore[no-any-return]


def test_search_prices_every_flight_through_pricing() -> None:
    resp = dispatch(
        flights.routes(ME, SVC, fake_pricing), req("/search", **{"from": "ams", "to": "LIS"})
    )
    assert resp.status == 200
    assert [f["flight"] for f in resp.body["flights"]] == flights.flights_on("AMS", "LIS")
    for f in resp.body["flights"]:
        assert f["price"] == pricing.quote_cents(f["flight"]) / 100
        assert f["pricing"]["service"] == "pricing"


@pytest.mark.parametrize(
    "query",
    [
        {"from": "AMS"},
        {"from": "AMS", "to": "AMS"},
        {"from": "AM", "to": "LIS"},
        {"from": "AMS", "to": "L1S"},
    ],
)
def test_search_rejects_bad_routes(query: dict[str, str]) -> None:
    resp = dispatch(flights.routes(ME, SVC, fake_pricing), req("/search", **query))
    assert resp.status == 400


def test_search_with_a_malformed_quote_blames_pricing() -> None:
    def broken(svc: ServiceAddress, path: str, query: Mapping[str, str]) -> dict[str, Any]:
        return {"price": "cheap"}

    resp = dispatch(flights.routes(ME, SVC, broken), req("/search", **{"from": "AMS", "to": "LIS"}))
    assert resp.status == 502
    assert resp.body["downstream"] == "pricing"


def test_cheapest_breaks_ties_by_flight_code() -> None:
    search = {
        "flights": [
            {"flight": "TP1", "price": 10},
            {"flight": "KL1", "price": 10},
            {"flight": "A1", "price": 11},
        ]
    }
    assert frontend.cheapest(search)["flight"] == "KL1"


@pytest.mark.parametrize(
    "search", [{}, {"flights": []}, {"flights": [{"flight": "KL1"}]}, {"flights": "x"}]
)
def test_cheapest_blames_flights_for_a_malformed_search(search: dict[str, Any]) -> None:
    with pytest.raises(DownstreamError) as err:
        frontend.cheapest(search)
    assert err.value.service == "flights"


def test_downstream_400_reaches_the_caller_as_400() -> None:
    def says_400(svc: ServiceAddress, path: str, query: Mapping[str, str]) -> dict[str, Any]:
        raise DownstreamError("flights", "answered 400", {"error": "from and to are both AMS"}, 400)

    resp = dispatch(
        frontend.routes(ME, SVC, says_400), req("/book", **{"from": "AMS", "to": "AMS"})
    )
    assert resp.status == 400
    assert resp.body == {"error": "from and to are both AMS"}


def test_dispatch_health_and_unknown_paths() -> None:
    routes = pricing.routes(ME)
    assert dispatch(routes, req("/healthz")).body == "ok"
    missing = dispatch(routes, req("/nope"))
    assert missing.status == 404
    assert missing.body["routes"] == ["/quote"]


def test_service_address_from_env() -> None:
    env = {"MY_SVC_SERVICE_HOST": "10.96.0.12", "MY_SVC_SERVICE_PORT": "80"}
    assert ServiceAddress.from_env("my-svc", env) == ServiceAddress("my-svc", "10.96.0.12", 80)


@pytest.mark.parametrize(
    ("env", "hint"),
    [
        ({}, "FLIGHTS_SERVICE_HOST"),
        ({"FLIGHTS_SERVICE_HOST": "10.96.0.1"}, "FLIGHTS_SERVICE_PORT"),
        ({"FLIGHTS_SERVICE_HOST": "10.96.0.1", "FLIGHTS_SERVICE_PORT": "http"}, "not a port"),
        ({"FLIGHTS_SERVICE_HOST": "10.96.0.1", "FLIGHTS_SERVICE_PORT": "70000"}, "outside"),
    ],
)
def test_service_address_errors_say_what_to_set(env: dict[str, str], hint: str) -> None:
    with pytest.raises(ConfigError, match=hint):
        ServiceAddress.from_env("flights", env)


def test_pod_identity_from_env() -> None:
    env = {
        "POD_NAME": "a-0",
        "POD_NAMESPACE": "travel",
        "POD_IP": "10.244.1.11",
        "NODE_NAME": "node2",
    }
    assert PodIdentity.from_env(env) == PodIdentity("a-0", "travel", "10.244.1.11", "node2")
    assert PodIdentity.from_env({}).node == "unknown"
