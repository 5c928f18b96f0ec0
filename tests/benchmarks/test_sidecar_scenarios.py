"""The two sidecar benchmark scenarios come up, carry HTTP and bulk traffic through their
sidecars (not around them), and leave nothing behind when stopped (twice)."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pyroute2 import netns as pr_netns

import nsutil

# The harness's package is `meshbench` with benchmarks/ on sys.path (as mesh_bench.py runs).
BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

from meshbench import haproxy  # noqa: E402
from meshbench import sidecar_cluster as sc  # noqa: E402
from meshbench.scenario import Endpoint, Running  # noqa: E402
from meshbench.sidecar import SidecarScenario  # noqa: E402

BULK_MIB = 4
MIB = 1 << 20


def own_cluster_name(prefix: str, placement: str) -> str:
    """Not the scenarios' own names, which a benchmark run on this machine may be using."""
    return f"{prefix}-{placement[0]}"


def http_request(ep: Endpoint) -> tuple[int, int]:
    """One 1 KB POST from the client pod; (status, body length) of the answer."""
    s = nsutil.socket_at(ep.netns)
    try:
        s.settimeout(10)
        s.connect((ep.host, ep.port))
        body = b"q" * 1024
        s.sendall(
            b"POST /x HTTP/1.1\r\nHost: server\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"connection closed before an answer: {data!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in lines[1:]
            if line.lower().startswith(b"content-length:")
        )
        while len(rest) < length:
            chunk = s.recv(65536)
            assert chunk, "connection closed in the body"
            rest += chunk
        return int(lines[0].split()[1]), len(rest)
    finally:
        s.close()


def bulk_transfer(ep: Endpoint, mib: int) -> int:
    """Stream `mib` MiB to the sink; how many MiB it acknowledged (one byte each)."""
    s = nsutil.socket_at(ep.netns)
    try:
        s.settimeout(20)
        s.connect((ep.host, ep.port))
        s.sendall(b"b" * (mib * MIB))
        acks = 0
        while acks < mib:
            chunk = s.recv(64)
            if not chunk:
                break
            acks += len(chunk)
        return acks
    finally:
        s.close()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def cluster_netns(name: str) -> list[str]:
    return [n for n in pr_netns.listnetns() if n.startswith(f"{name}-")]


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def assert_nothing_left(name: str, running: Running, workdir: Path) -> None:
    assert cluster_netns(name) == []
    pids = [p for group in running.proxies.values() for p in group]
    assert pids and not any(alive(p) for p in pids)
    assert [p.name for p in workdir.iterdir()] == []


def access_lines(log: Path) -> list[dict[str, object]]:
    out = []
    for line in log.read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("event") == "connection complete":
            out.append(doc)
    return out


@pytest.mark.netns
@pytest.mark.parametrize("placement", sc.PLACEMENTS)
def test_sidecar_scenario_carries_traffic_through_per_pod_tunnels(
    placement: str, tmp_path: Path
) -> None:
    scenario = SidecarScenario(placement, own_cluster_name("tsc", placement))
    assert scenario.cluster_name not in {"e2e", "agents", "rst"}
    running = scenario.start(tmp_path)
    try:
        assert set(running.proxies) == {"client-sidecar", "server-sidecar"}
        sidecars = [p for group in running.proxies.values() for p in group]
        assert len(set(sidecars)) == 2 and all(alive(p) for p in sidecars)
        # Each sidecar lives in its own pod's netns, as a sidecar container does.
        client_ns = os.stat(running.http.netns).st_ino
        assert os.stat(f"/proc/{running.proxies['client-sidecar'][0]}/ns/net").st_ino == (client_ns)

        assert http_request(running.http) == (200, 1024)
        assert bulk_transfer(running.bulk, BULK_MIB) == BULK_MIB

        # Through the sidecars: the client's logs both connections as outbound HBONE to
        # the server pod's 15008, the server's as inbound, with the bytes they carried.
        server = running.http.host
        client_log = scenario.sidecar_log(sc.CLIENT_POD)
        server_log = scenario.sidecar_log(sc.SERVER_POD)

        def logged(log: Path, direction: str) -> list[dict[str, object]]:
            return [d for d in access_lines(log) if d.get("direction") == direction]

        def both_logged() -> bool:
            return (
                len(logged(client_log, "outbound")) >= 2 and len(logged(server_log, "inbound")) >= 2
            )

        assert wait_for(both_logged), client_log.read_text()[-2000:]
        out = {str(d["dst.addr"]): d for d in logged(client_log, "outbound")}
        assert set(out) == {f"{server}:{sc.HTTP_PORT}", f"{server}:{sc.BULK_PORT}"}
        assert all(d["dst.hbone_addr"] == f"{server}:15008" for d in out.values())
        assert int(str(out[f"{server}:{sc.BULK_PORT}"]["bytes_sent"])) >= BULK_MIB * MIB
        inbound = logged(server_log, "inbound")
        assert {d.get("src.identity") for d in inbound} == {
            "spiffe://cluster.local/ns/bench/sa/client"
        }
    finally:
        scenario.stop()
    scenario.stop()  # idempotent
    assert_nothing_left(scenario.cluster_name, running, tmp_path)


def ask(tls: ssl.SSLSocket) -> bytes:
    """One GET over an open TLS connection; the first bytes of the answer."""
    tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = tls.recv(100)
    if not answer:
        raise ConnectionError("closed without an answer")
    return answer


def rows(stats: list[dict[str, str]], proxy: str, name: str) -> dict[str, str]:
    return next(r for r in stats if r["pxname"] == proxy and r["svname"] == name)


@pytest.mark.netns
@pytest.mark.parametrize("placement", sc.PLACEMENTS)
def test_haproxy_scenario_carries_traffic_through_the_mtls_pair(
    placement: str, tmp_path: Path
) -> None:
    scenario = haproxy.HaproxyScenario(placement, own_cluster_name("thap", placement))
    assert scenario.cluster_name not in {"e2e", "agents", "rst"}
    running = scenario.start(tmp_path)
    files = scenario.files
    assert files is not None
    try:
        assert set(running.proxies) == {"client-sidecar", "server-sidecar"}
        assert all(alive(p) for group in running.proxies.values() for p in group)
        # The app addresses the server pod's app, as in every scenario: its sidecar is
        # transparent (the capture sends it there).
        assert scenario.cluster is not None
        server_ip = sc.pod_ip(scenario.cluster, sc.SERVER_POD)
        assert (running.http.host, running.http.port) == (server_ip, sc.HTTP_PORT)
        assert (running.bulk.host, running.bulk.port) == (server_ip, sc.BULK_PORT)

        assert http_request(running.http) == (200, 1024)
        assert bulk_transfer(running.bulk, BULK_MIB) == BULK_MIB

        # The request crossed both sidecars: the client's upstream to the peer and the
        # server's frontend each count it; the bulk bytes went through both TCP proxies
        # (byte counters are updated when the connection ends, hence the wait).
        client = scenario.stats_socket("client")
        server = scenario.stats_socket("server")
        assert rows(haproxy.stats(client), "http_out", "peer")["stot"] == "1"
        assert rows(haproxy.stats(server), "http_in", "FRONTEND")["req_tot"] == "1"

        def carried(sock: Path, proxy: str, name: str) -> int:
            return int(rows(haproxy.stats(sock), proxy, name)["bin"] or 0)

        assert wait_for(lambda: carried(client, "bulk_out", "peer") >= BULK_MIB * MIB)
        assert wait_for(lambda: carried(server, "bulk_in", "app") >= BULK_MIB * MIB)

        # mTLS is enforced: the server sidecar answers a client holding a mesh
        # certificate, and refuses one without, even if it trusts the mesh root.
        def tls_client(cert: bool) -> ssl.SSLSocket:
            ctx = ssl.create_default_context(cafile=str(files / "ca.pem"))
            ctx.check_hostname = False
            if cert:
                ctx.load_cert_chain(str(files / "client.pem"))
            raw = nsutil.socket_at(running.http.netns)
            raw.settimeout(5)
            raw.connect((server_ip, haproxy.SERVER_HTTP_PORT))
            # The handshake happens in `ask`, where a refusal is expected to surface.
            return ctx.wrap_socket(raw, do_handshake_on_connect=False)

        with tls_client(cert=True) as tls:
            assert ask(tls).startswith(b"HTTP/1.1 200")
        with tls_client(cert=False) as tls, pytest.raises((ssl.SSLError, ConnectionError)):
            # TLS 1.3: the server's verdict on the (missing) certificate arrives as an
            # alert after the handshake, on the first read.
            ask(tls)
    finally:
        scenario.stop()
    scenario.stop()  # idempotent
    assert_nothing_left(scenario.cluster_name, running, tmp_path)
    assert not files.exists()


# ---- without namespaces: the generated cluster and HAProxy configs ----------------------


def test_cluster_doc_places_the_server_by_placement() -> None:
    cross = sc.cluster_doc("scx", "cross-node", True)
    same = sc.cluster_doc("scs", "same-node", False)
    nodes = {d["name"]: {p["name"]: p["node"] for p in d["pods"]} for d in (cross, same)}
    assert nodes["scx"] == {sc.CLIENT_POD: "node1", sc.SERVER_POD: "node2"}
    assert nodes["scs"] == {sc.CLIENT_POD: "node1", sc.SERVER_POD: "node1"}
    assert [n["name"] for n in same["nodes"]] == ["node1"]
    # Only the tunnel sidecars need the mesh config to say the pods speak HBONE.
    assert cross["namespaces"][0]["labels"] == {"istio.io/dataplane-mode": "ambient"}
    assert same["namespaces"][0]["labels"] == {}
    with pytest.raises(sc.PlacementError, match="same-node"):
        sc.cluster_doc("x", "same-rack", True)


@pytest.mark.skipif(
    shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists(),
    reason="haproxy is not installed (scripts/setup.sh installs it)",
)
def test_haproxy_configs_pass_haproxys_own_check(tmp_path: Path) -> None:
    """HAProxy itself parses both configs and loads the certificates issued for them."""
    tls = haproxy.write_tls_files(tmp_path, "cluster.local", sc.NAMESPACE)
    client = haproxy.client_config(tls, tmp_path / "c.sock")
    server = haproxy.server_config(tls, tmp_path / "s.sock")
    assert "verify required" in client and "verify required" in server
    for name, text in (("client.cfg", client), ("server.cfg", server)):
        cfg = tmp_path / name
        cfg.write_text(text)
        check = subprocess.run(
            [haproxy.haproxy_binary(), "-c", "-f", str(cfg)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stdout + check.stderr
    assert (tmp_path / "client.pem").stat().st_mode & 0o077 == 0  # the key is private
