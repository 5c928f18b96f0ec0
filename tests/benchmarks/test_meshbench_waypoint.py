"""The `ambient-waypoint` scenario: its cluster binds the server's Service (port `http`) to
a waypoint; the harness finds it; the report renders its rows and the waypoint's targets
(met and not met) from a synthetic result; and, with namespaces, its requests cross the
waypoint and nothing is left behind."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import nsutil
from localcluster import xds
from localcluster.spec import parse_cluster

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

import meshbench.report as report  # noqa: E402
from meshbench import ambient_waypoint as aw  # noqa: E402
from meshbench import sidecar_cluster as sc  # noqa: E402
from meshbench.hist import Histogram  # noqa: E402

# ---- the cluster spec ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("placement", "server_node"),
    [("cross-node", "node2"), ("same-node", "node1")],
    ids=["cross-node", "same-node"],
)
def test_cluster_binds_the_server_service_to_a_waypoint(placement: str, server_node: str) -> None:
    text = yaml.safe_dump(aw.cluster_doc("wpt", placement))
    spec = parse_cluster(text, Path("/"))
    g = spec.gateway(sc.NAMESPACE, aw.WAYPOINT_NAME)
    assert g is not None and g.waypoint_for == "service" and not g.fail_open
    assert g.placed().node == aw.WAYPOINT_NODE
    assert spec.pod(sc.NAMESPACE, sc.SERVER_POD).node == server_node
    assert all(p.enrolled(spec) for p in spec.pods if not p.is_waypoint)

    svc = next(s for s in spec.services if s.name == aw.SERVICE and not s.gateway)
    assert xds.service_binding(spec, svc).problem is None
    entry = xds.service(svc, spec)
    # The tunnels read this: the Service's traffic goes to the waypoint's HBONE port.
    assert entry["waypoint"] == {
        "hostname": f"{sc.NAMESPACE}/{aw.WAYPOINT_NAME}.{sc.NAMESPACE}.svc.cluster.local",
        "hboneMtlsPort": 15008,
    }
    # The HTTP port is declared http (the waypoint parses it); the bulk port is not.
    assert entry["ports"][sc.HTTP_PORT]["name"] == "http"
    assert entry["ports"][sc.BULK_PORT]["name"] == "bulk"


def test_unknown_placement_is_refused() -> None:
    with pytest.raises(sc.PlacementError, match="cross-node"):
        aw.WaypointScenario("same-rack")


def test_harness_registers_the_scenario_in_both_placements() -> None:
    import mesh_bench

    found, skipped = mesh_bench.registry()
    names = [n for n, _ in found]
    assert "ambient-waypoint" in names
    assert all(s["scenario"] != "ambient-waypoint" for s in skipped)
    factory = dict(found)["ambient-waypoint"]
    built = [factory(p) for p in sc.PLACEMENTS]
    assert [(s.name, s.placement) for s in built] == [
        ("ambient-waypoint", "cross-node"),
        ("ambient-waypoint", "same-node"),
    ]


# ---- the report, from a synthetic result ---------------------------------------------------


def run(
    scenario: str,
    p99: float,
    *,
    placement: str = "cross-node",
    rate: str = "1000",
    waypoint_cpu: float | None = None,
    waypoint_idle_mb: float = 40.0,
) -> dict[str, Any]:
    h = Histogram()
    h.record_all(int(p99 * 1e6 * f) for f in (0.4, 0.6, 1.0))
    c: dict[str, Any] = {"total": {"cpu_s_per_1000_req": 0.2, "rss_kb": 90 * 1024.0}}
    idle: dict[str, Any] = {"tunnel-node1": {"rss_kb": 30 * 1024.0}}
    if scenario == "ambient-waypoint":
        c["waypoint"] = {
            "cpu_s": 0.5,
            "cpu_s_per_1000_req": waypoint_cpu,
            "rss_kb": 55 * 1024.0,
        }
        idle["waypoint"] = {"rss_kb": waypoint_idle_mb * 1024}
    return {
        "scenario": scenario,
        "placement": placement,
        "round": 0,
        "idle": idle,
        "http": {
            rate: {
                "latency_ms": {"p50": p99 / 3, "p90": p99 / 2, "p99": p99, "p999": p99 * 2},
                "achieved_rps": float(rate),
                "unanswered": 0,
                "hist_ns": h.to_json(),
                "costs": c,
            }
        },
    }


def synthetic() -> dict[str, Any]:
    # fmt: off
    return {
        "time": "now",
        "params": {"mode": "quick", "rounds": 1},
        "runs": [
            run("none", 0.5),
            run("ambient", 0.8),
            run("ambient-waypoint", 1.5, waypoint_cpu=0.2, waypoint_idle_mb=42.0),
            run("sidecar-haproxy", 1.2),
            run("ambient", 0.9, placement="same-node"),
            run("ambient-waypoint", 2.4, placement="same-node", waypoint_cpu=0.31,
                waypoint_idle_mb=75.0),
        ],
        "skipped": [],
        "earlier": {},
    }
    # fmt: on


def targets_by(doc: dict[str, Any]) -> dict[tuple[str, str], report.TargetResult]:
    return {(t.name, t.placement): t for t in report.targets(report.aggregate(doc["runs"]))}


CPU = "waypoint vCPU per 1000 rps"
ADDED = "waypoint added p99 over ambient L4 at 1000 rps"
IDLE = "waypoint idle RSS"


@pytest.mark.parametrize(
    ("name", "placement", "value", "met"),
    [
        (CPU, "cross-node", 0.2, True),
        (CPU, "same-node", 0.31, False),
        (ADDED, "cross-node", 0.7, True),
        (ADDED, "same-node", 1.5, False),
        (IDLE, "cross-node", 42.0, True),
        (IDLE, "same-node", 75.0, False),
    ],
    ids=[
        "cpu-met", "cpu-not-met", "added-p99-met", "added-p99-not-met", "idle-rss-met",
        "idle-rss-not-met",
    ],
)  # fmt: skip
def test_waypoint_targets(name: str, placement: str, value: float, met: bool) -> None:
    t = targets_by(synthetic())[(name, placement)]
    assert t.value == pytest.approx(value)
    assert t.met is met


def test_waypoint_targets_without_ambient_or_waypoint_rows() -> None:
    doc = synthetic()
    doc["runs"] = [r for r in doc["runs"] if r["scenario"] != "ambient"]
    ts = targets_by(doc)
    assert ts[(ADDED, "cross-node")].met is None  # no L4 row to compare with: not measured
    assert ts[(CPU, "cross-node")].met is True
    doc["runs"] = [r for r in synthetic()["runs"] if r["scenario"] != "ambient-waypoint"]
    assert not [k for k in targets_by(doc) if k[0].startswith("waypoint")]
    # A waypoint whose process vanished has no CPU figure: not measured, never "met".
    doc["runs"] = [run("ambient", 0.8), run("ambient-waypoint", 1.0, waypoint_cpu=None)]
    assert targets_by(doc)[(CPU, "cross-node")].met is None


def _tables(md: str) -> list[list[str]]:
    tables: list[list[str]] = []
    current: list[str] = []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_report_renders_waypoint_rows_and_verdicts() -> None:
    md = report.render(synthetic(), [])
    tables = _tables(md)
    for t in tables:
        assert len({line.count("|") for line in t}) == 1, t
    targets = tables[0]
    # One round: no spread beside the figure.
    assert "| waypoint vCPU per 1000 rps | cross-node | 0.200 vCPU |  | <= 0.25 vCPU | met |" in (
        targets
    )
    assert (
        "| waypoint added p99 over ambient L4 at 1000 rps | same-node | 1.500 ms |  | <= 1 ms "
        "| **not met** |"
    ) in targets
    assert "| waypoint idle RSS | same-node | 75.000 MB |  | <= 60 MB | **not met** |" in targets

    assert "## Waypoint (L7) beside ambient (L4) and sidecar-haproxy" in md
    assert "Waypoint idle RSS: cross-node 42.0 MB, same-node 75.0 MB." in md
    side = next(t for t in tables if "added p99 over ambient ms" in t[0])
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): line for line in side[2:]}
    assert set(rows) == {
        ("cross-node", "1000", "ambient"),
        ("cross-node", "1000", "ambient-waypoint"),
        ("cross-node", "1000", "sidecar-haproxy"),
        ("same-node", "1000", "ambient"),
        ("same-node", "1000", "ambient-waypoint"),
    }
    wp = rows[("cross-node", "1000", "ambient-waypoint")]
    assert "| 1.500 | 3.000 | +0.700 | 0.200 | 55.0 |" in wp
    assert "| +0.400 | n/a | n/a |" in rows[("cross-node", "1000", "sidecar-haproxy")]

    # The per-metric tables gain the waypoint's own rows, and its scenario row.
    assert "## Waypoint CPU per 1000 requests at 1000 rps (= vCPU per 1000 rps)" in md
    assert "## Waypoint RSS, idle" in md
    p99 = _tables(md.split("## p99 latency at 1000 rps", 1)[1])[0]
    assert any(line.startswith("| ambient-waypoint | 1.500 | 3.00 |") for line in p99)


def test_report_without_a_waypoint_has_no_waypoint_section() -> None:
    doc = synthetic()
    doc["runs"] = [r for r in doc["runs"] if r["scenario"] != "ambient-waypoint"]
    md = report.render(doc, [])
    assert "Waypoint" not in md and "waypoint" not in md


# ---- in namespaces: the requests cross the waypoint ------------------------------------------


def http_status(netns: str, host: str, port: int, n: int) -> list[int]:
    """`n` 1 KB POSTs over one keep-alive connection; the statuses, in order."""
    s = nsutil.socket_at(netns)
    statuses = []
    try:
        s.settimeout(10)
        s.connect((host, port))
        f = s.makefile("rb")
        for _ in range(n):
            body = b"q" * 1024
            s.sendall(b"POST /x HTTP/1.1\r\nHost: server\r\nContent-Length: 1024\r\n\r\n" + body)
            status = int(f.readline().split()[1])
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert len(f.read(length)) == length
            statuses.append(status)
    finally:
        s.close()
    return statuses


def requests_logged(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("event") == "request complete":
            out.append(doc)
    return out


@pytest.mark.netns
def test_scenario_requests_cross_the_waypoint(tmp_path: Path) -> None:
    scenario = aw.WaypointScenario("cross-node", "twpx")
    running = scenario.start(tmp_path)
    try:
        assert set(running.proxies) == {"waypoint", "tunnel-node1", "tunnel-node2"}
        assert scenario.cluster is not None
        svc = next(s for s in scenario.cluster.spec.services if s.name == aw.SERVICE)
        assert (running.http.host, running.http.port) == (str(svc.vip), sc.HTTP_PORT)
        assert http_status(running.http.netns, running.http.host, running.http.port, 5) == [200] * 5
        log = scenario.log()
        assert log is not None
        deadline = time.monotonic() + 5
        while len(requests_logged(log)) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        done = requests_logged(log)
        assert len(done) >= 6, log.read_text()[-2000:]  # the readiness request, then ours
        assert {d.get("status") for d in done} == {200}
        server_ip = sc.pod_ip(scenario.cluster, sc.SERVER_POD)
        assert {str(d.get("upstream_host", "")).split(":")[0] for d in done} == {server_ip}
        pids = [p for group in running.proxies.values() for p in group]
    finally:
        scenario.stop()
    scenario.stop()  # idempotent
    assert not nsutil_netns_left("twpx")
    assert not any(Path(f"/proc/{p}").exists() and _alive(p) for p in pids)
    assert list(tmp_path.iterdir()) == []


def nsutil_netns_left(name: str) -> list[str]:
    from pyroute2 import netns as pr_netns

    return [n for n in pr_netns.listnetns() if n.startswith(f"{name}-")]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
