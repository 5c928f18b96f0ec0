"""Admin (15000) and metrics (15020) servers, run for real on loopback ephemeral ports.

The admin server is fed by `StaticSource`, a small in-test `AdminSource` with fixed answers
(the tunnel's node is the real source; here the servers' HTTP behaviour is what is tested).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterator
from ipaddress import ip_address
from typing import Any

import aiohttp
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from meshcore.admin.server import (
    AdminServer,
    MetricsServer,
    process_metrics,
    state_change_refusal,
)
from meshcore.observability.metrics import ResponseFlags, TcpMetrics, tcp_labels
from tests.support.aio import Loop

CONFIG = {
    "node": "n1",
    "loggingLevel": "info",
    "workloads": [{"uid": "travel/frontend", "name": "frontend", "ips": ["10.244.1.10"]}],
    "services": [],
}
CONNECTIONS = [
    {
        "direction": "outbound",
        "pod": "travel/frontend",
        "src": "10.244.1.10:40000",
        "dst": "10.244.2.20:9000",
        "hbone": "10.244.2.20:15008",
        "srcIdentity": "spiffe://cluster.local/ns/travel/sa/frontend",
        "dstIdentity": "spiffe://cluster.local/ns/travel/sa/bookings",
        "bytesSent": 10,
        "bytesReceived": 20,
        "startedAt": 1700000000.5,
    }
]


class StaticSource:
    """An AdminSource with fixed answers that records what it was asked."""

    def __init__(self) -> None:
        self.quits = 0
        self.explained: list[tuple[str, str]] = []
        self.before_quit: list[bool] = []
        self.on_quit: Any = None

    def config_dump(self) -> dict[str, Any]:
        # An address object on purpose: the server must still produce JSON.
        return {**CONFIG, "extra": ip_address("10.0.0.1")}

    def connections(self) -> list[dict[str, Any]]:
        return CONNECTIONS

    def explain(self, source: str, destination: str) -> dict[str, Any]:
        self.explained.append((source, destination))
        if source != "travel/frontend":
            raise ValueError(f"no pod {source}")
        if destination == "boom:1":
            raise RuntimeError("internal failure")
        return {"source": {"workload": source}, "destination": {"input": destination}}

    def request_quit(self) -> None:
        self.quits += 1
        if self.on_quit is not None:
            self.on_quit()


@pytest.fixture
def restore_log_level() -> Iterator[None]:
    wrapper = structlog.get_config()["wrapper_class"]
    root = logging.getLogger().level
    yield
    structlog.configure(wrapper_class=wrapper)
    logging.getLogger().setLevel(root)


async def started_admin(aio: Loop, source: StaticSource) -> tuple[AdminServer, str]:
    server = aio.closing(AdminServer(source, port=0, host="127.0.0.1"))
    await server.start()
    assert server.port != 0
    return server, f"http://127.0.0.1:{server.port}"


def test_admin_endpoints_with_a_static_source(aio):
    source = StaticSource()

    async def main() -> None:
        _, base = await started_admin(aio, source)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/config_dump") as r:
                assert r.status == 200
                assert r.content_type == "application/json"
                assert await r.json() == {**CONFIG, "extra": "10.0.0.1"}
            async with http.get(f"{base}/connections") as r:
                assert r.status == 200
                assert await r.json() == CONNECTIONS

            q = {"source": "travel/frontend", "destination": "bookings:80"}
            async with http.get(f"{base}/debug/explain", params=q) as r:
                assert r.status == 200
                assert await r.json() == {
                    "source": {"workload": "travel/frontend"},
                    "destination": {"input": "bookings:80"},
                }
            assert source.explained == [("travel/frontend", "bookings:80")]

            q = {"source": "travel/ghost", "destination": "bookings:80"}
            async with http.get(f"{base}/debug/explain", params=q) as r:
                assert r.status == 400
                assert await r.json() == {"error": "no pod travel/ghost"}

            async with http.get(f"{base}/debug/explain?source=travel/frontend") as r:
                assert r.status == 400
                assert "destination" in (await r.json())["error"]

            # A source that fails unexpectedly is a 500 that says why, not a hang.
            q = {"source": "travel/frontend", "destination": "boom:1"}
            async with http.get(f"{base}/debug/explain", params=q) as r:
                assert r.status == 500
                assert "internal failure" in (await r.json())["error"]

    aio.run(main)


def test_admin_index_and_unknown_paths_list_the_endpoints(aio):
    async def main() -> None:
        _, base = await started_admin(aio, StaticSource())
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/") as r:
                assert r.status == 200
                index = await r.text()
            async with http.get(f"{base}/stats") as r:
                assert r.status == 404
                missing = await r.text()
        for text in (index, missing):
            for path in ("/config_dump", "/connections", "/debug/explain", "/logging", "/memory"):
                assert path in text
            assert "/quitquitquit" in text
        assert missing.startswith("invalid path")

    aio.run(main)


def test_memory_says_where_the_process_memory_is(aio):
    """Python objects kept alive show as blocks and arenas; a big buffer as C heap or
    mmapped memory; both in the resident size."""

    async def main() -> None:
        _, base = await started_admin(aio, StaticSource())
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/memory") as r:
                assert r.status == 200
                before = await r.json()
            kept = [(i, str(i)) for i in range(200_000)]  # ~20 MB of small objects
            big = bytearray(50_000_000)
            async with http.get(f"{base}/memory") as r:
                after = await r.json()
        assert len(kept) == 200_000 and len(big) == 50_000_000
        for key in ("rss_bytes", "rss_high_bytes", "python_blocks", "arenas", "heap_in_use"):
            assert isinstance(before[key], int) and before[key] > 0, key
        assert after["python_blocks"] - before["python_blocks"] > 400_000  # tuples and strs
        assert after["arenas"] - before["arenas"] >= 10  # 1 MiB each
        assert (
            after["mmapped"] + after["heap_in_use"] - before["mmapped"] - before["heap_in_use"]
            > 45_000_000
        )
        assert after["rss_bytes"] - before["rss_bytes"] > 10_000_000  # the objects are resident

    aio.run(main)


def test_logging_level_changes_at_runtime(aio, restore_log_level):
    probe = structlog.get_logger("ztunnel.probe")

    def logged_at(level: str) -> bool:
        with capture_logs() as captured:
            getattr(probe, level)("probe line")
        return bool(captured)

    async def main() -> None:
        _, base = await started_admin(aio, StaticSource())
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/logging?level=error") as r:
                assert r.status == 200
                assert await r.json() == {"level": "error"}
            assert not logged_at("warning")
            assert logged_at("error")
            assert logging.getLogger().level == logging.ERROR

            async with http.get(f"{base}/logging") as r:
                assert await r.json() == {"level": "error"}

            # trace is accepted as ztunnel/Envoy spell it and means debug here.
            async with http.post(f"{base}/logging", params={"level": "trace"}) as r:
                assert r.status == 200
                assert await r.json() == {"level": "debug"}
            assert logged_at("debug")
            assert structlog.get_logger().get_effective_level() == logging.DEBUG

            async with http.post(f"{base}/logging", params={"level": "warning"}) as r:
                assert await r.json() == {"level": "warning"}
            assert not logged_at("info")

            async with http.post(f"{base}/logging", params={"level": "loud"}) as r:
                assert r.status == 400
                assert "loud" in (await r.json())["error"]
            # A bad level changes nothing.
            async with http.post(f"{base}/logging") as r:
                assert await r.json() == {"level": "warning"}

    aio.run(main)


def test_quitquitquit_answers_then_requests_quit(aio):
    source = StaticSource()
    answered = threading.Event()

    def client(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /quitquitquit HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
                if data.endswith(b"\r\n\r\nOK\n"):
                    answered.set()
            return data

    # request_quit blocks the server's loop until the client holds the full answer: that
    # can only happen if the answer was written before request_quit was called.
    source.on_quit = lambda: source.before_quit.append(answered.wait(10))

    async def main() -> bytes:
        server, base = await started_admin(aio, source)
        async with aiohttp.ClientSession() as http, http.get(f"{base}/quitquitquit") as r:
            assert r.status == 405
        assert source.quits == 0
        return await asyncio.to_thread(client, server.port)

    data = aio.run(main)
    assert data.startswith(b"HTTP/1.0 200") or data.startswith(b"HTTP/1.1 200")
    assert data.endswith(b"\r\n\r\nOK\n")
    assert source.quits == 1
    assert source.before_quit == [True]


def test_metrics_server_serves_both_paths_with_the_text_format(aio):
    metrics = TcpMetrics()
    ok = tcp_labels(
        reporter="destination",
        source=None,
        source_identity=None,
        destination=None,
        destination_identity=None,
        service=None,
        mtls=True,
    )
    metrics.opened(ok)
    metrics.closed(ok, received=123, sent=456)
    metrics.refused(
        tcp_labels(
            reporter="destination",
            source=None,
            source_identity=None,
            destination=None,
            destination_identity=None,
            service=None,
            response_flags=ResponseFlags.DENY,
            mtls=True,
        )
    )

    def istio_samples(text: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("istio_"):
                    out[f"{s.name}/{s.labels['response_flags']}"] = s.value
        return out

    async def main() -> tuple[list[str], list[str]]:
        server = aio.closing(MetricsServer(metrics, process_metrics(), port=0, host="127.0.0.1"))
        await server.start()
        bodies, types = [], []
        async with aiohttp.ClientSession() as http:
            for path in ("/metrics", "/stats/prometheus"):
                async with http.get(f"http://127.0.0.1:{server.port}{path}") as r:
                    assert r.status == 200
                    types.append(r.headers["Content-Type"])
                    bodies.append(await r.text())
            async with http.get(f"http://127.0.0.1:{server.port}/other") as r:
                assert r.status == 404
        return bodies, types

    bodies, types = aio.run(main)
    assert types == [TcpMetrics.CONTENT_TYPE] * 2
    assert istio_samples(bodies[0]) == istio_samples(bodies[1])
    assert istio_samples(bodies[0]) == {
        "istio_tcp_connections_opened_total/-": 2,
        "istio_tcp_connections_closed_total/-": 1,
        "istio_tcp_connections_closed_total/DENY": 1,
        "istio_tcp_received_bytes_total/-": 123,
        "istio_tcp_sent_bytes_total/-": 456,
        "istio_tcp_sockets_open/-": 0,
    }
    # The extra exposition (process metrics) follows the TCP metrics.
    assert "process_resident_memory_bytes" in bodies[0]


def test_servers_stop_and_free_their_port(aio):
    async def main() -> None:
        server, _ = await started_admin(aio, StaticSource())
        port = server.port
        await server.stop()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()

    aio.run(main)


@pytest.mark.parametrize(
    ("method", "remote", "refused"),
    [
        ("GET", "10.0.0.1", False),  # read-only: as before, from anywhere it can reach
        ("HEAD", None, False),
        ("POST", "127.0.0.1", False),
        ("POST", "127.0.0.2", False),  # all of 127/8 is the node's own
        ("POST", "::1", False),
        ("POST", "10.0.0.1", True),
        ("PUT", "10.0.0.1", True),
        ("POST", "::ffff:10.0.0.1", True),
        ("POST", None, True),  # unknown peer: refused, not trusted
        ("POST", "not-an-address", True),
    ],
)
def test_state_changes_only_from_loopback(method, remote, refused):
    why = state_change_refusal(method, remote)
    assert (why is not None) == refused
    if why is not None:
        assert method in why and "loopback" in why


_OFF_NODE_CHILD = """
import asyncio, json, subprocess, sys
from meshcore.admin.server import AdminServer

class Source:
    quits = 0
    def config_dump(self): return {}
    def connections(self): return []
    def explain(self, s, d): return {}
    def request_quit(self): Source.quits += 1

def ip(*args):
    subprocess.run(["ip", *args], check=True)

async def ask(host, method, path):
    reader, writer = await asyncio.open_connection(host, port)
    head = f"{method} {path} HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 0\\r\\n\\r\\n"
    writer.write(head.encode())
    data = await reader.read()
    writer.close()
    return int(data.split()[1])

async def main():
    global port
    # A netns of our own (unshare --net), with an address outside 127/8: a peer that is
    # not the node's loopback, as a pod or another node would be.
    ip("link", "set", "lo", "up")
    ip("addr", "add", "10.99.0.1/32", "dev", "lo")
    server = AdminServer(Source(), port=0, host="0.0.0.0")  # the misconfiguration
    await server.start()
    port = server.port
    out = {
        "off_get": await ask("10.99.0.1", "GET", "/config_dump"),
        "off_quit": await ask("10.99.0.1", "POST", "/quitquitquit"),
        "off_logging": await ask("10.99.0.1", "POST", "/logging?level=debug"),
        "quits_after_off": Source.quits,
        "lo_quit": await ask("127.0.0.1", "POST", "/quitquitquit"),
        "refused": server.refused_remote,
    }
    await server.close()
    print("RESULT " + json.dumps(out))

asyncio.run(main())
"""


@pytest.mark.netns  # its own network namespace, with an address that is not loopback
def test_admin_refuses_state_changes_from_off_the_node():
    from tests.support.child import run_child_under

    result, _ = run_child_under(("unshare", "--net"), _OFF_NODE_CHILD)
    assert result == {
        "off_get": 200,
        "off_quit": 403,
        "off_logging": 403,
        "quits_after_off": 0,
        "lo_quit": 200,
        "refused": 2,
    }
