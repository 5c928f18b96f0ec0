"""The demo's L7 act on a real travel cluster (netns): each scene's checks hold, and what
it prints is the evidence it checked (read from the waypoint, never a constant)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambientctl import demo_l7
from localcluster import mesh
from localcluster.state import live_netns

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
