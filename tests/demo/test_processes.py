"""The travel apps as real processes on loopback, wired only through environment variables."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error

import flights
import pricing
import pytest

from tests.demo.apps import DEMO_DIR, AppRunner, Chain
from tests.support.ports import free_port

ROUTE = "/book?from=AMS&to=LIS"


def test_book_reports_the_whole_chain(chain: Chain) -> None:
    status, body = chain.frontend.get(ROUTE)
    assert status == 200, body
    hops = body["chain"]
    assert [h["service"] for h in hops] == ["frontend", "flights", "pricing"]
    assert [h["served_by"] for h in hops] == ["frontend-0", "flights-0", "pricing-0"]
    assert [h["node"] for h in hops] == ["node1", "node2", "node2"]
    assert all(h["seen_client"] == "127.0.0.1" for h in hops)
    assert all(h["namespace"] == "travel" for h in hops)


def test_book_picks_the_cheapest_deterministic_price(chain: Chain) -> None:
    expected = min((pricing.quote_cents(c), c) for c in flights.flights_on("AMS", "LIS"))
    first = chain.frontend.get(ROUTE)[1]
    assert first["booking"] == {
        "flight": expected[1],
        "price": expected[0] / 100,
        "currency": "EUR",
    }
    assert chain.frontend.get(ROUTE)[1]["booking"] == first["booking"]


def test_every_app_answers_healthz(chain: Chain) -> None:
    for app in (chain.frontend, chain.flights, chain.pricing):
        assert app.get("/healthz") == (200, "ok")


def test_bad_route_is_a_400_with_a_reason(chain: Chain) -> None:
    status, body = chain.frontend.get("/book?from=AMS&to=AMS")
    assert status == 400
    assert "AMS" in body["error"]


def test_pricing_down_is_a_502_naming_pricing(own_chain: Chain) -> None:
    chain = own_chain
    assert chain.pricing.stop() == 0
    status, body = chain.flights.get("/search?from=AMS&to=LIS")
    assert status == 502
    assert body["downstream"] == "pricing"
    status, body = chain.frontend.get(ROUTE)
    assert status == 502
    assert body["downstream"] == "flights"
    assert body["cause"]["downstream"] == "pricing"


def test_flights_down_is_a_502_naming_flights(own_chain: Chain) -> None:
    chain = own_chain
    assert chain.flights.stop() == 0
    status, body = chain.frontend.get(ROUTE)
    assert status == 502
    assert body["downstream"] == "flights"
    assert "refused" in body["error"].lower()


def test_a_silent_downstream_times_out(runner: AppRunner) -> None:
    # A listener that never accepts: connects succeed (kernel backlog), answers never come.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        env = {
            "PRICING_SERVICE_HOST": "127.0.0.1",
            "PRICING_SERVICE_PORT": str(silent.getsockname()[1]),
        }
        app = runner.start("flights", env, "--timeout", "0.5")
        began = time.monotonic()
        status, body = app.get("/search?from=AMS&to=LIS")
        took = time.monotonic() - began
    assert status == 502
    assert body["downstream"] == "pricing"
    assert "within 0.5 s" in body["error"]
    assert took < 4.0


@pytest.mark.parametrize("script", ["frontend", "flights", "pricing"])
def test_sigterm_exits_cleanly(runner: AppRunner, script: str) -> None:
    env = {"FLIGHTS_SERVICE_HOST": "127.0.0.1", "FLIGHTS_SERVICE_PORT": "1"} | {
        "PRICING_SERVICE_HOST": "127.0.0.1",
        "PRICING_SERVICE_PORT": "1",
    }
    app = runner.start(script, env)
    assert app.stop() == 0
    assert "stopped" in app.stderr()


def test_missing_service_address_stops_startup_with_a_hint(runner: AppRunner) -> None:
    app = runner.start("frontend", {}, wait=False)
    assert app.proc.wait(10) == 2
    assert "FLIGHTS_SERVICE_HOST" in app.stderr()


def test_idle_waits_for_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "travel/idle.py"], cwd=DEMO_DIR)
    try:
        time.sleep(0.3)
        assert proc.poll() is None  # still idling
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_fetch_prints_the_body(chain: Chain) -> None:
    ok = subprocess.run(
        [sys.executable, "travel/fetch.py", chain.frontend.url("/healthz")],
        cwd=DEMO_DIR,
        capture_output=True,
        timeout=15,
        check=False,
    )
    assert (ok.returncode, ok.stdout) == (0, b"ok")
    down = subprocess.run(
        [sys.executable, "travel/fetch.py", "--timeout", "2", f"http://127.0.0.1:{free_port()}/"],
        cwd=DEMO_DIR,
        capture_output=True,
        timeout=15,
        check=False,
    )
    assert down.returncode == 2
    assert b"failed" in down.stderr


def _fetch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "travel/fetch.py", *args],
        cwd=DEMO_DIR,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_every_answer_names_the_pod_that_served_it(chain: Chain) -> None:
    done = _fetch(chain.flights.url("/healthz"), "--count", "3")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines == [{"status": 200, "served_by": "flights-0", "error": None}] * 3


def test_fetch_count_reports_each_outcome_and_the_worst_exit_code(runner: AppRunner) -> None:
    flaky = runner.start("pricing", {}, "--fail-every", "3", pod="pricing-1")
    done = _fetch(flaky.url("/quote?flight=KL1"), "--count", "6")
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["status"] for line in lines] == [200, 200, None, 200, 200, None]
    assert all("failed" in line["error"] for line in lines if line["status"] is None)
    assert done.returncode == 2
    bad = _fetch(flaky.url("/quote?flight=nope"), "--count", "1")
    assert (bad.returncode, json.loads(bad.stdout)["status"]) == (1, 400)


def test_a_flaky_replica_resets_but_its_health_check_never_fails(runner: AppRunner) -> None:
    flaky = runner.start("pricing", {}, "--fail-every", "2", pod="pricing-1")
    assert all(flaky.get("/healthz") == (200, "ok") for _ in range(4))
    statuses: list[int | None] = []
    for _ in range(4):
        try:
            statuses.append(flaky.get("/quote?flight=KL1")[0])
        except (ConnectionError, http.client.HTTPException, urllib.error.URLError):
            statuses.append(None)
    assert statuses == [200, None, 200, None]
    assert "dropping /quote?flight=KL1 (--fail-every 2)" in flaky.stderr()


@pytest.mark.parametrize("value", ["-1", "x"], ids=["negative", "not-a-number"])
def test_fail_every_rejects_bad_counts(value: str) -> None:
    done = subprocess.run(
        [sys.executable, "travel/pricing.py", "--fail-every", value],
        cwd=DEMO_DIR,
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert done.returncode == 2 and "--fail-every" in done.stderr


def test_fetch_method_is_sent(chain: Chain) -> None:
    # The apps answer GET only: a POST reaching one is refused by the server itself, which
    # shows the method went out as asked.
    done = _fetch(chain.pricing.url("/quote?flight=KL1"), "--method", "post")
    assert done.returncode == 1 and "answered 501" in done.stderr


def test_fetch_count_stops_at_the_deadline(chain: Chain) -> None:
    done = _fetch(chain.pricing.url("/healthz"), "--count", "100000", "--deadline", "0.5")
    assert done.returncode == 0
    assert 0 < len(done.stdout.splitlines()) < 100000
