"""L4 policy, metrics, the admin port and `explain`, end to end on the two-node cluster.

Policies are applied to the running mesh (the tunnels re-read their config file); every test
starts and ends with no policy, and waits until both tunnels report the policy set it expects
before sending anything.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import nsutil
from localcluster import mesh
from localcluster.processes import is_running, read_records

from .common import HERE, connect, echo, pod_ip, tunnel_log, vip

pytestmark = pytest.mark.netns

ADMIN = 15000
METRICS = 15020
TD = "cluster.local"


def spiffe(ns: str, sa: str) -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{sa}"


def admin(c: mesh.Cluster, node: str, path: str, method: str = "GET") -> tuple[int, Any]:
    status, body = mesh.node_http(c.layout, node, ADMIN, path, method)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def loaded_keys(c: mesh.Cluster, node: str) -> set[str]:
    """What a tunnel enforces: policy keys, PeerAuthentication keys with their mode."""
    _, dump = admin(c, node, "/config_dump")
    keys = {f"{p['namespace']}/{p['name']}" for p in dump["policies"]}
    keys |= {f"{p['namespace']}/{p['name']}={p['mode']}" for p in dump["peerAuthentications"]}
    return keys


def wait_policies(c: mesh.Cluster, keys: set[str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(loaded_keys(c, n.name) == keys for n in c.spec.nodes):
            return
        time.sleep(0.05)
    raise AssertionError(f"tunnels never loaded exactly {keys}")


def apply(c: mesh.Cluster, *docs: dict[str, Any]) -> None:
    mesh.apply_policies(c, list(docs))
    want = set()
    for d in mesh.read_policies(c):
        key = f"{d['metadata']['namespace']}/{d['metadata']['name']}"
        if d["kind"] == "PeerAuthentication":
            key += f"={d['spec']['mtls']['mode']}"
        want.add(key)
    wait_policies(c, want)


def authz(
    name: str, spec: dict[str, Any], ns: str = "mesh", annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": meta,
        "spec": spec,
    }


def peer_auth(name: str, ns: str, mode: str) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"mtls": {"mode": mode}},
    }


SERVER_B = {"matchLabels": {"app": "server-b"}}


@pytest.fixture(autouse=True)
def no_policies(cluster: mesh.Cluster) -> Iterator[None]:
    wait_policies(cluster, set())
    try:
        yield
    finally:
        left = mesh.read_policies(cluster)
        for p in left:
            m = p["metadata"]
            mesh.delete_policy(cluster, p["kind"], m["namespace"], m["name"])
        if left:
            wait_policies(cluster, set())


def reachable(c: mesh.Cluster, ns: str, pod: str, ip: str, port: int) -> bool:
    """Whether an echo round trip succeeds. A denied connection is accepted by the source
    tunnel (or the destination's 15006) and then closed or reset without data."""
    try:
        _, data = echo(c, ns, pod, ip, port, b"ping")
    except OSError:
        return False
    return data == b"ping"


def bulk_reachable(c: mesh.Cluster, pod: str, ip: str, port: int) -> bool:
    """Whether testapp's bulk port answers a mesh pod's request for 10 bytes."""
    try:
        with connect(c, "mesh", pod, ip, port) as s:
            s.sendall(b"SEND 10 1\n")
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(100):
                got += chunk
    except OSError:
        return False
    return len(got) >= 10


def server_b(c: mesh.Cluster) -> str:
    return pod_ip(c, "mesh", "server-b")


# ---- AuthorizationPolicy ------------------------------------------------------------------


def test_allow_by_principal_admits_only_that_principal(cluster: mesh.Cluster) -> None:
    assert reachable(cluster, "mesh", "server-a", server_b(cluster), 9000)
    apply(
        cluster,
        authz(
            "only-client",
            {
                "selector": SERVER_B,
                "action": "ALLOW",
                "rules": [{"from": [{"source": {"principals": [f"{TD}/ns/mesh/sa/client"]}}]}],
            },
        ),
    )
    assert reachable(cluster, "mesh", "client", server_b(cluster), 9000)
    assert not reachable(cluster, "mesh", "server-a", server_b(cluster), 9000)
    # The selector scopes it: server-a has no policy, so anyone may still reach it.
    assert reachable(cluster, "mesh", "server-a", pod_ip(cluster, "mesh", "server-a"), 9000)


def test_deny_by_namespace_and_port(cluster: mesh.Cluster) -> None:
    apply(
        cluster,
        authz(
            "no-bulk-from-mesh",
            {
                "action": "DENY",
                "rules": [
                    {
                        "from": [{"source": {"namespaces": ["mesh"]}}],
                        "to": [{"operation": {"ports": ["9001"]}}],
                    }
                ],
            },
        ),
    )
    b = server_b(cluster)
    assert reachable(cluster, "mesh", "client", b, 9000)
    assert not bulk_reachable(cluster, "client", b, 9001)
    # Plaintext clients have no namespace: the rule does not match them.
    assert reachable(cluster, "plain", "outsider", b, 9000)


def test_allow_to_ports_denies_other_ports(cluster: mesh.Cluster) -> None:
    apply(
        cluster,
        authz(
            "echo-only",
            {"selector": SERVER_B, "rules": [{"to": [{"operation": {"ports": ["9000"]}}]}]},
        ),
    )
    b = server_b(cluster)
    assert reachable(cluster, "mesh", "client", b, 9000)
    assert not bulk_reachable(cluster, "client", b, 9001)


def test_deny_by_ip_block_applies_to_mesh_and_plaintext_clients(cluster: mesh.Cluster) -> None:
    client_ip = pod_ip(cluster, "mesh", "client")
    outsider_ip = pod_ip(cluster, "plain", "outsider")
    apply(
        cluster,
        authz(
            "block-two",
            {
                "selector": SERVER_B,
                "action": "DENY",
                "rules": [{"from": [{"source": {"ipBlocks": [f"{client_ip}/32", outsider_ip]}}]}],
            },
        ),
    )
    b = server_b(cluster)
    assert not reachable(cluster, "mesh", "client", b, 9000)
    assert not reachable(cluster, "plain", "outsider", b, 9000)
    assert reachable(cluster, "mesh", "server-a", b, 9000)


def test_dry_run_policy_is_logged_not_enforced(cluster: mesh.Cluster) -> None:
    apply(
        cluster,
        authz(
            "would-deny-all",
            {"selector": SERVER_B, "action": "DENY", "rules": [{}]},
            annotations={"istio.io/dry-run": "true"},
        ),
    )
    assert reachable(cluster, "mesh", "client", server_b(cluster), 9000)
    deadline = time.monotonic() + 10
    while "dry-run policy evaluated" not in cluster.tunnel_log("n2").read_text():
        assert time.monotonic() < deadline, "the dry-run evaluation was never logged"
        time.sleep(0.05)
    line = next(
        json.loads(x)
        for x in cluster.tunnel_log("n2").read_text().splitlines()
        if "dry-run policy evaluated" in x
    )
    assert line["policy"] == "mesh/would-deny-all"
    assert line["matched"] is True


def test_l7_fields_drop_an_allow_rule_with_a_visible_warning(cluster: mesh.Cluster) -> None:
    apply(
        cluster,
        authz(
            "get-only",
            {"selector": SERVER_B, "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]},
        ),
    )
    # The only rule needs L7, so at L4 this ALLOW policy matches nothing: all denied.
    assert not reachable(cluster, "mesh", "client", server_b(cluster), 9000)
    _, dump = admin(cluster, "n2", "/config_dump")
    (policy,) = [p for p in dump["policies"] if p["name"] == "get-only"]
    assert any("methods" in w for w in policy["warnings"])


def test_policy_change_closes_open_connections_it_now_denies(cluster: mesh.Cluster) -> None:
    b = server_b(cluster)
    with (
        connect(cluster, "mesh", "client", b, 9000) as kept,
        connect(cluster, "mesh", "server-a", b, 9000) as other,
    ):
        for s in (kept, other):
            s.makefile("rb").readline()
            s.sendall(b"before")
            assert s.recv(100) == b"before"
        apply(
            cluster,
            authz(
                "deny-client",
                {
                    "selector": SERVER_B,
                    "action": "DENY",
                    "rules": [{"from": [{"source": {"principals": [f"{TD}/ns/mesh/sa/client"]}}]}],
                },
            ),
        )
        kept.settimeout(10)
        try:
            tail = kept.recv(100)
        except ConnectionResetError:
            tail = b""
        assert tail == b"", "the now-denied connection must be closed"
        # The connection the new policy still allows is untouched.
        other.sendall(b"after")
        assert other.recv(100) == b"after"
    assert "connection closed by policy change" in cluster.tunnel_log("n2").read_text()


# ---- PeerAuthentication -------------------------------------------------------------------


@pytest.mark.parametrize("ns", ["mesh", "istio-system"])
def test_strict_refuses_plaintext_permissive_accepts_it(cluster: mesh.Cluster, ns: str) -> None:
    b = server_b(cluster)
    apply(cluster, peer_auth("mtls", ns, "PERMISSIVE"))
    assert reachable(cluster, "plain", "outsider", b, 9000)
    apply(cluster, peer_auth("mtls", ns, "STRICT"))
    assert not reachable(cluster, "plain", "outsider", b, 9000)
    assert not reachable(cluster, "plain", "outsider", vip(cluster, "mesh", "server"), 80)
    # Mesh clients arrive over mTLS: STRICT does not concern them.
    assert reachable(cluster, "mesh", "client", b, 9000)


# ---- metrics and access log ------------------------------------------------------------


def scrape(c: mesh.Cluster, node: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, body = mesh.node_http(c.layout, node, METRICS, "/stats/prometheus")
    assert status == 200
    status2, body2 = mesh.node_http(c.layout, node, METRICS, "/metrics")
    assert status2 == 200 and body2.split(b"\n")[0] == body.split(b"\n")[0]
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def total(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **want: str
) -> float:
    return sum(
        v
        for (n, labels), v in samples.items()
        if n == name and all((k, val) in labels for k, val in want.items())
    )


def test_metrics_count_exactly_the_bytes_the_apps_moved(cluster: mesh.Cluster) -> None:
    pair = {
        "source_principal": spiffe("mesh", "client"),
        "destination_principal": spiffe("mesh", "server"),
        "destination_workload_namespace": "mesh",
    }
    before = {n.name: scrape(cluster, n.name) for n in cluster.spec.nodes}
    payload = bytes(range(256)) * 1171  # 299 776 bytes
    seen, data = echo(cluster, "mesh", "client", vip(cluster, "mesh", "server"), 80, payload)
    assert data == payload
    request = len(payload)
    response = len(seen) + 1 + len(payload)  # the server's first line, then the echo

    def delta(node: str, name: str, reporter: str) -> float:
        after = scrape(cluster, node)
        return total(after, name, reporter=reporter, **pair) - total(
            before[node], name, reporter=reporter, **pair
        )

    deadline = time.monotonic() + 10
    while (
        delta("n1", "istio_tcp_connections_closed_total", "source") < 1
        or delta("n2", "istio_tcp_connections_closed_total", "destination") < 1
    ):
        assert time.monotonic() < deadline, "the connection was never counted as closed"
        time.sleep(0.05)
    for node, reporter in (("n1", "source"), ("n2", "destination")):
        assert delta(node, "istio_tcp_connections_opened_total", reporter) == 1
        assert delta(node, "istio_tcp_connections_closed_total", reporter) == 1
        assert delta(node, "istio_tcp_received_bytes_total", reporter) == request
        assert delta(node, "istio_tcp_sent_bytes_total", reporter) == response
    after = scrape(cluster, "n1")
    flags = {
        dict(labels).get("response_flags")
        for (n, labels), _ in after.items()
        if n == "istio_tcp_connections_opened_total"
    }
    assert "-" in flags
    series = [
        dict(lbl)
        for (n, lbl), _ in after.items()
        if n == "istio_tcp_received_bytes_total"
        and ("reporter", "source") in lbl
        and ("source_principal", spiffe("mesh", "client")) in lbl
    ]
    assert all(x["connection_security_policy"] == "mutual_tls" for x in series)
    # This test's connection went to the VIP: its series names the service.
    assert any(x["destination_service"].startswith("server.mesh.svc") for x in series)


def test_denied_connections_are_counted_with_the_deny_flag(cluster: mesh.Cluster) -> None:
    apply(cluster, authz("deny-all", {"selector": SERVER_B, "action": "DENY", "rules": [{}]}))
    before = scrape(cluster, "n2")
    assert not reachable(cluster, "mesh", "client", server_b(cluster), 9000)
    deadline = time.monotonic() + 10
    # As upstream: the flag is known only when the connection is recorded as closed.
    name = "istio_tcp_connections_closed_total"
    while total(scrape(cluster, "n2"), name, response_flags="DENY", reporter="destination") <= (
        total(before, name, response_flags="DENY", reporter="destination")
    ):
        assert time.monotonic() < deadline, "the denial was never counted"
        time.sleep(0.05)


def access_lines(c: mesh.Cluster, size: int, want: int = 2) -> list[dict[str, Any]]:
    """The access-log lines (both tunnels) of connections that sent exactly `size` bytes:
    an unusual count picks one connection's lines out. Waits until `want` are written."""
    deadline = time.monotonic() + 10
    while True:
        lines = [
            x
            for x in (json.loads(line) for line in tunnel_log(c).splitlines())
            if x.get("event") == "connection complete" and x.get("bytes_sent") == size
        ]
        if len(lines) >= want or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_access_log_has_every_field_on_both_ends(cluster: mesh.Cluster) -> None:
    size = 7919  # an unusual byte count picks this connection's lines out of the logs
    with connect(cluster, "mesh", "client", vip(cluster, "mesh", "server"), 80) as s:
        s.makefile("rb").readline()
        s.sendall(b"q" * size)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    fields = {
        "src.addr", "src.workload", "src.namespace", "src.identity", "dst.addr",
        "dst.hbone_addr", "dst.service", "dst.workload", "dst.namespace", "dst.identity",
        "direction", "bytes_sent", "bytes_recv", "duration",
    }  # fmt: skip
    lines = access_lines(cluster, size)
    by_dir = {x["direction"]: x for x in lines}
    assert set(by_dir) == {"outbound", "inbound"}
    out, inbound = by_dir["outbound"], by_dir["inbound"]
    assert fields - set(out) == set()
    # The destination's tunnel knows no service (the VIP was resolved at the source).
    assert fields - set(inbound) == {"dst.service"}
    for line in (out, inbound):
        assert line["src.identity"] == spiffe("mesh", "client")
        assert line["src.workload"] == "client" and line["src.namespace"] == "mesh"
        assert line["dst.identity"] == spiffe("mesh", "server")
        assert line["dst.workload"] == "server-b"
        assert line["dst.addr"] == f"{server_b(cluster)}:9000"
        assert line["dst.hbone_addr"] == f"{server_b(cluster)}:15008"
    assert out["src.addr"].startswith(pod_ip(cluster, "mesh", "client") + ":")
    assert out["dst.service"].startswith("server.mesh.svc")


# ---- admin and explain ------------------------------------------------------------------


def test_config_dump_shows_state_certificates_and_listeners(cluster: mesh.Cluster) -> None:
    status, dump = admin(cluster, "n1", "/config_dump")
    assert status == 200
    assert dump["node"] == "n1"
    names = {(w["namespace"], w["name"]) for w in dump["workloads"]}
    assert ("mesh", "server-b") in names and ("plain", "legacy") in names
    assert any(s["hostname"].startswith("server.mesh.svc") for s in dump["services"])
    certs = {c["identity"]: c for c in dump["certificates"]}
    # n1 runs client and server-a: exactly their identities, nothing of n2's pods only.
    assert set(certs) == {spiffe("mesh", "client"), spiffe("mesh", "server")}
    for c in certs.values():
        assert c["state"] == "valid"
        assert int(c["serial"], 16) > 0
        assert c["notAfter"] > time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    pods = {p["workload"]: p for p in dump["pods"]}
    assert set(pods) == {"mesh/client", "mesh/server-a"}
    client_ip = pod_ip(cluster, "mesh", "client")
    assert pods["mesh/client"]["listeners"]["outbound"].endswith(":15001")
    assert any(client_ip in v or "0.0.0.0" in v for v in pods["mesh/client"]["listeners"].values())


def test_connections_lists_open_ones_with_identities_and_live_bytes(
    cluster: mesh.Cluster,
) -> None:
    b = server_b(cluster)
    with connect(cluster, "mesh", "client", b, 9000) as s:
        host, port = s.getsockname()[:2]
        first = s.makefile("rb").readline()
        s.sendall(b"z" * 5000)
        got = 0
        while got < 5000:
            got += len(s.recv(65536))
        deadline = time.monotonic() + 10
        while True:
            _, out = admin(cluster, "n1", "/connections")
            mine = [c for c in out if c["src"] == f"{host}:{port}"]
            _, inbound = admin(cluster, "n2", "/connections")
            theirs = [
                c
                for c in inbound
                if c["direction"] == "inbound" and c["srcIdentity"] == spiffe("mesh", "client")
            ]
            if (mine and mine[0]["bytesSent"] == 5000 and theirs) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        (c,) = mine
        assert c["direction"] == "outbound" and c["pod"] == "mesh/client"
        assert c["dst"] == f"{b}:9000" and c["hbone"] == f"{b}:15008"
        assert c["srcIdentity"] == spiffe("mesh", "client")
        assert c["dstIdentity"] == spiffe("mesh", "server")
        assert c["bytesSent"] == 5000 and c["bytesReceived"] == len(first) + 5000
        assert theirs and theirs[0]["pod"] == "mesh/server-b"
    # Closed connections leave the table.
    deadline = time.monotonic() + 10
    while any(c["src"] == f"{host}:{port}" for c in admin(cluster, "n1", "/connections")[1]):
        assert time.monotonic() < deadline, "a closed connection stayed listed"
        time.sleep(0.05)


def test_admin_is_node_local_only(cluster: mesh.Cluster) -> None:
    # From the other node, n1's admin port must not answer on n1's address.
    s = nsutil.socket_at(cluster.layout.node("n2").netns_path)
    s.settimeout(3)
    try:
        with pytest.raises(ConnectionRefusedError):
            s.connect((str(cluster.spec.node("n1").ip), ADMIN))
    finally:
        s.close()
    # Metrics, unlike admin, are for scrapers elsewhere.
    status, _ = mesh.node_http(cluster.layout, "n1", METRICS, "/metrics")
    assert status == 200


def test_logging_level_changes_at_runtime(cluster: mesh.Cluster) -> None:
    status, _ = admin(cluster, "n1", "/logging?level=debug", "POST")
    assert status == 200
    try:
        status, body = admin(cluster, "n1", "/logging")
        assert status == 200 and "debug" in json.dumps(body)
        status, _ = admin(cluster, "n1", "/logging?level=loud", "POST")
        assert status == 400
    finally:
        admin(cluster, "n1", "/logging?level=info", "POST")


def explain(c: mesh.Cluster, src: str, dst: str) -> dict[str, Any]:
    status, body = admin(c, "n1", f"/debug/explain?source={src}&destination={dst}")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def test_explain_agrees_with_the_data_path(cluster: mesh.Cluster) -> None:
    apply(
        cluster,
        authz(
            "no-bulk-for-client",
            {
                "selector": SERVER_B,
                "action": "DENY",
                "rules": [
                    {
                        "from": [{"source": {"principals": [f"{TD}/ns/mesh/sa/client"]}}],
                        "to": [{"operation": {"ports": ["9001"]}}],
                    }
                ],
            },
        ),
    )
    bulk = explain(cluster, "mesh/client", "server.mesh:81")
    assert bulk["route"] == "HBONE"
    (ep,) = bulk["endpoints"]
    assert ep["workload"] == "mesh/server-b" and ep["port"] == 9001
    assert ep["hbone"] == f"{server_b(cluster)}:15008"
    assert ep["authorization"]["allowed"] is False
    assert ep["authorization"]["policy"] == "mesh/no-bulk-for-client"
    assert ep["authorization"]["rule"] == 0
    echo_port = explain(cluster, "mesh/client", "server.mesh:80")
    assert echo_port["endpoints"][0]["authorization"]["allowed"] is True
    plain = explain(cluster, "mesh/client", f"{pod_ip(cluster, 'plain', 'legacy')}:9000")
    assert plain["route"] == "PASSTHROUGH"
    # And the data path does what was explained.
    assert reachable(cluster, "mesh", "client", vip(cluster, "mesh", "server"), 80)
    assert not bulk_reachable(cluster, "client", vip(cluster, "mesh", "server"), 81)
    assert reachable(cluster, "mesh", "client", pod_ip(cluster, "plain", "legacy"), 9000)
    # The policy names the client: another mesh identity still gets bulk data.
    assert bulk_reachable(cluster, "server-a", vip(cluster, "mesh", "server"), 81)
    status, _ = admin(cluster, "n1", "/debug/explain?source=mesh/nobody&destination=x:1")
    assert status == 400


def test_ambientctl_views_and_apply_on_a_running_node(cluster: mesh.Cluster) -> None:
    root = str(cluster.state.dir.parent)
    cfile = str(HERE / "cluster.yaml")

    def ctl(*args: str, stdin: str | None = None) -> str:
        out = subprocess.run(
            [str(Path(sys.executable).parent / "ambientctl"), "--state-root", root, *args],
            capture_output=True,
            text=True,
            timeout=60,
            input=stdin,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "server-b" in ctl("workloads", cfile)
    doc = json.loads(ctl("certificates", cfile, "--node", "n1", "-o", "json"))
    assert {c["identity"] for c in doc} == {spiffe("mesh", "client"), spiffe("mesh", "server")}
    text = ctl("explain", cfile, "mesh/client", "server.mesh:80")
    assert "server-b" in text and "allow" in text.lower()
    policy = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: mesh}
spec:
  selector: {matchLabels: {app: server-b}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]}]
"""
    assert "AuthorizationPolicy mesh/deny-client created" in ctl(
        "apply", cfile, "-f", "-", stdin=policy
    )
    wait_policies(cluster, {"mesh/deny-client"})
    assert "deny-client" in ctl("policies", cfile)
    assert not reachable(cluster, "mesh", "client", server_b(cluster), 9000)
    text = ctl("explain", cfile, "mesh/client", "server.mesh:80")
    assert "mesh/deny-client" in text
    ctl("delete", cfile, "AuthorizationPolicy", "mesh/deny-client")
    wait_policies(cluster, set())
    assert reachable(cluster, "mesh", "client", server_b(cluster), 9000)


# ---- same node: delivered in process ------------------------------------------------------


def test_same_node_connections_are_delivered_in_process_and_fully_accounted(
    cluster: mesh.Cluster,
) -> None:
    """client and server-a share n1: the tunnel joins them in process (no TLS hop that
    starts and ends in itself), yet the connection is listed, logged and counted by both
    reporters exactly as an HBONE one, and policy still decides."""
    a = pod_ip(cluster, "mesh", "server-a")
    pair = {
        "source_principal": spiffe("mesh", "client"),
        "destination_principal": spiffe("mesh", "server"),
        "destination_workload": "server-a",
    }
    for dst, delivery in ((a, "in-process"), (server_b(cluster), "hbone")):
        _, why = admin(cluster, "n1", f"/debug/explain?source=mesh/client&destination={dst}:9000")
        assert [e["delivery"] for e in why["endpoints"]] == [delivery]
    before = scrape(cluster, "n1")
    size = 6007  # picks this connection's access-log lines out
    with connect(cluster, "mesh", "client", a, 9000) as s:
        host, port = s.getsockname()[:2]
        first = s.makefile("rb").readline()
        assert first.decode().split(":")[0] == pod_ip(cluster, "mesh", "client")
        s.sendall(b"s" * size)
        got = 0
        while got < size:
            got += len(s.recv(65536))
        deadline = time.monotonic() + 10
        while True:
            _, table = admin(cluster, "n1", "/connections")
            mine = [c for c in table if c["src"] == f"{host}:{port}"]
            if len(mine) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        by_dir = {c["direction"]: c for c in mine}
        assert set(by_dir) == {"outbound", "inbound"}
        for c in by_dir.values():
            assert c["hbone"] == "in-process"
            assert c["srcIdentity"] == spiffe("mesh", "client")
            assert c["dstIdentity"] == spiffe("mesh", "server")
            assert c["bytesSent"] == size
        assert by_dir["inbound"]["pod"] == "mesh/server-a"
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    response = len(first) + size
    deadline = time.monotonic() + 10
    name = "istio_tcp_connections_closed_total"
    while any(
        total(scrape(cluster, "n1"), name, reporter=r, **pair)
        - total(before, name, reporter=r, **pair)
        < 1
        for r in ("source", "destination")
    ):
        assert time.monotonic() < deadline, "the connection was never counted as closed"
        time.sleep(0.05)
    after = scrape(cluster, "n1")
    for reporter in ("source", "destination"):
        for metric, want in (
            ("istio_tcp_connections_opened_total", 1),
            ("istio_tcp_received_bytes_total", size),
            ("istio_tcp_sent_bytes_total", response),
        ):
            got_v = total(after, metric, reporter=reporter, **pair)
            assert got_v - total(before, metric, reporter=reporter, **pair) == want, metric
    series = [
        dict(lbl)
        for (n, lbl), _ in after.items()
        if n == "istio_tcp_received_bytes_total" and ("destination_workload", "server-a") in lbl
    ]
    assert series and all(x["connection_security_policy"] == "mutual_tls" for x in series)
    lines = access_lines(cluster, size)
    assert {x["direction"] for x in lines} == {"outbound", "inbound"}
    assert all(x["dst.hbone_addr"] == "in-process" for x in lines)

    # Policy decides in process as it does for HBONE: denied, and counted as a denial.
    apply(
        cluster,
        authz(
            "not-client",
            {
                "selector": {"matchLabels": {"app": "server-a"}},
                "action": "DENY",
                "rules": [{"from": [{"source": {"principals": [f"{TD}/ns/mesh/sa/client"]}}]}],
            },
        ),
    )
    denied_before = total(scrape(cluster, "n1"), name, response_flags="DENY", **pair)
    assert not reachable(cluster, "mesh", "client", a, 9000)
    deadline = time.monotonic() + 10
    while total(scrape(cluster, "n1"), name, response_flags="DENY", **pair) < denied_before + 2:
        assert time.monotonic() < deadline, "the denial was not counted by both reporters"
        time.sleep(0.05)


def test_same_node_goes_over_hbone_when_in_process_delivery_is_off(cluster: mesh.Cluster) -> None:
    """SAME_NODE_IN_PROCESS=false: n1's tunnel is upgraded to one with it off, and a
    same-node connection then takes the HBONE hop to the pod's own 15008, as any other."""
    name = "ztunnel-n1-hbone"
    old = mesh.process_record(cluster, mesh.tunnel_name("n1"))
    assert old is not None
    mesh.start_node_tunnel(cluster, "n1", name, {"SAME_NODE_IN_PROCESS": "false"})
    log = cluster.state.log_dir / f"{name}.log"
    deadline = time.monotonic() + 20
    while (log.read_text() if log.exists() else "").count('"pod enrolled"') < 2:
        assert time.monotonic() < deadline, "the new tunnel never served n1's two pods"
        time.sleep(0.05)
    mesh.stop_tunnel(cluster, "n1")  # the old one drains and leaves
    a = pod_ip(cluster, "mesh", "server-a")
    _, why = admin(cluster, "n1", f"/debug/explain?source=mesh/client&destination={a}:9000")
    assert [e["delivery"] for e in why["endpoints"]] == ["hbone"]
    with connect(cluster, "mesh", "client", a, 9000) as s:
        host, port = s.getsockname()[:2]
        first = s.makefile("rb").readline()
        assert first.decode().split(":")[0] == pod_ip(cluster, "mesh", "client")
        deadline = time.monotonic() + 10
        while True:
            _, table = admin(cluster, "n1", "/connections")
            # Over HBONE the inbound end sees the tunnel's own connection as the client
            # (same IP, another port): it is found by pod and identity instead.
            mine = [c for c in table if c["src"] == f"{host}:{port}"] + [
                c
                for c in table
                if c["direction"] == "inbound"
                and c["pod"] == "mesh/server-a"
                and c["srcIdentity"] == spiffe("mesh", "client")
            ]
            if len(mine) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert {c["direction"] for c in mine} == {"outbound", "inbound"}
        assert all(c["hbone"] == f"{a}:15008" for c in mine)
    assert reachable(cluster, "mesh", "client", a, 9000)


def test_quitquitquit_stops_the_tunnel(cluster: mesh.Cluster) -> None:
    # Last in this module: the cluster is torn down after it.
    (rec,) = [r for r in read_records(cluster.state.pidfile_dir) if r.name == "ztunnel-n2"]
    status, _ = admin(cluster, "n2", "/quitquitquit", "POST")
    assert status == 200
    deadline = time.monotonic() + 15
    while is_running(rec.pid, rec.start_time):
        assert time.monotonic() < deadline, "the tunnel did not exit"
        time.sleep(0.05)
