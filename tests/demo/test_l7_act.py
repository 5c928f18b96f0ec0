"""The demo's L7 act on a real travel cluster (netns): each scene's checks hold, and what
it prints is the evidence it checked (read from the waypoint, never a constant)."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambientctl import demo_l7
from localcluster import mesh
from localcluster.state import live_netns
from waypoint.telemetry.export import encode_spans
from waypoint.telemetry.tracing import Span, SpanKind, StatusCode

pytestmark = pytest.mark.netns

CLUSTER_FILE = Path(demo_l7.DEMO_DIR) / "travel-cluster.yaml"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[mesh.Cluster]:
    c = mesh.up(CLUSTER_FILE, tmp_path)
    try:
        yield c
    finally:
        mesh.down(c.spec.name, tmp_path)
        assert live_netns(c.spec.name) == []


def test_the_l7_act(cluster: mesh.Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    act = demo_l7.Act(cluster)
    try:
        assert act.setup(), capsys.readouterr().out
        assert act.canary(), capsys.readouterr().out
        canary = capsys.readouterr().out
        assert act.retries(), capsys.readouterr().out
        retries = capsys.readouterr().out
        assert act.timeout(), capsys.readouterr().out
        timeout = capsys.readouterr().out
        assert act.authorization(), capsys.readouterr().out
        authz = capsys.readouterr().out
        assert act.request_metrics(), capsys.readouterr().out
        metrics = capsys.readouterr().out
        assert act.trace(), capsys.readouterr().out
        trace = capsys.readouterr().out
    finally:
        act.close()
    # The split printed is the one counted: the per-pod lines add up to the total.
    total = int(re.search(r"(\d+) requests from frontend-0", canary).group(1))  # type: ignore[union-attr]
    per_pod = [int(n) for n in re.findall(r"^\s+flights-\S+\s+\(v\d\) (\d+)$", canary, re.M)]
    assert total >= demo_l7.CANARY_REQUESTS and sum(per_pod) == total
    # Before the retry policy the flaky replica shows as 503 UC; after, every quote is a 200.
    assert "'503'" in retries and "'UC'" in retries
    assert f"{{'200': {demo_l7.RETRY_REQUESTS}}}" in retries
    assert "answered 504" in timeout and "response_flags UT" in timeout
    assert "answered 403" in authz and "'RBAC: access denied'" in authz
    assert "denied by travel/pricing-read-only" in authz
    assert re.search(r"frontend\s+pricing\s+\S+\s+403\s+RBAC\s+1", metrics)
    # One server span over two attempts: the reset one and its retry.
    assert re.search(r"^\s+server 'GET VirtualService travel/pricing\[0\]'", trace, re.M)
    assert len(re.findall(r"^\s+client 'GET'", trace, re.M)) >= 2
    assert "http.request.resend_count=1" in trace


def _post(port: int, body: bytes, length: str | None = None) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        head = f"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Length: {length or len(body)}"
        s.sendall(head.encode() + b"\r\n\r\n" + body)
        return int(s.recv(4096).split(b" ", 2)[1])


def test_the_receiver_keeps_what_it_decodes_and_refuses_the_rest() -> None:
    # In this process's own netns: the receiver's socket is made through setns (root).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    collector = demo_l7.Collector("/proc/self/ns/net", port)
    try:
        span = Span(b"\x01" * 16, b"\x02" * 8, None, "GET", SpanKind.SERVER, 1, 2, (),
                    StatusCode.UNSET)  # fmt: skip
        assert _post(port, encode_spans([span], "waypoint.travel")) == 200
        assert _post(port, b"\xff\xff\xff") == 400
        assert _post(port, b"", length="-5") == 400
        assert _post(port, b"", length="many") == 400
        assert [s.name for s in collector.trace("01" * 16)] == ["GET"]
        assert collector.posts == 1 and len(collector.errors) == 3
    finally:
        collector.close()
