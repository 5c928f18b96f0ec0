"""ambientctl views: renderers against sample admin JSON, and fetching from a real admin
server on loopback."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import socket
from typing import Any

import pytest

from ambientctl import views
from ambientctl.cli import build_parser
from meshcore.admin.server import AdminServer

W_FRONTEND = {
    "uid": "travel/frontend",
    "name": "frontend",
    "namespace": "travel",
    "serviceAccount": "frontend",
    "identity": "spiffe://cluster.local/ns/travel/sa/frontend",
    "ips": ["10.244.1.10"],
    "node": "n1",
    "protocol": "HBONE",
    "status": "HEALTHY",
    "canonicalName": "frontend",
    "canonicalRevision": "v1",
    "labels": {"app": "frontend"},
    "services": {},
    "waypoint": None,
}
W_BOOKINGS_1 = {
    **W_FRONTEND,
    "uid": "travel/bookings-1",
    "name": "bookings-1",
    "serviceAccount": "bookings",
    "identity": "spiffe://cluster.local/ns/travel/sa/bookings",
    "ips": ["10.244.2.20"],
    "node": "n2",
    "services": {"travel/bookings.travel.svc.cluster.local": {"80": 9000}},
}
W_BOOKINGS_2 = {
    **W_BOOKINGS_1,
    "uid": "travel/bookings-2",
    "name": "bookings-2",
    "ips": ["10.244.2.21"],
    "status": "UNHEALTHY",
}
W_LEGACY = {
    **W_FRONTEND,
    "uid": "legacy/db",
    "name": "db",
    "namespace": "legacy",
    "ips": ["10.244.1.30"],
    "protocol": "TCP",
    "waypoint": "travel/waypoint.travel.svc.cluster.local",
}
SERVICE = {
    "name": "bookings",
    "namespace": "travel",
    "hostname": "bookings.travel.svc.cluster.local",
    "vips": ["/10.96.0.20"],
    "ports": {"80": 9000},
    "subjectAltNames": [],
    "waypoint": None,
    "endpoints": ["travel/bookings-1", "travel/bookings-2", "travel/gone"],
}
POLICIES = [
    {
        "name": "allow-frontend",
        "namespace": "travel",
        "scope": "WorkloadSelector",
        "action": "ALLOW",
        "dryRun": False,
        "selector": {"app": "bookings"},
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/travel/sa/frontend"]}}]}],
        "warnings": [],
    },
    {
        "name": "deny-get",
        "namespace": "travel",
        "scope": "Namespace",
        "action": "DENY",
        "dryRun": True,
        "selector": {},
        "rules": [],
        "warnings": ["rule 0: methods is an HTTP field; only its L4 part is enforced"],
    },
]


def dump(node: str, certs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "node": node,
        "loggingLevel": "info",
        "workloads": [W_FRONTEND, W_BOOKINGS_1, W_BOOKINGS_2, W_LEGACY],
        "services": [SERVICE],
        "policies": POLICIES,
        "peerAuthentications": [
            {
                "name": "strict",
                "namespace": "travel",
                "selector": {},
                "mode": "STRICT",
                "portLevelMtls": {"8080": "PERMISSIVE"},
            }
        ],
        "policyErrors": ["travel/broken: rules[0].from: not a list"],
        "certificates": certs,
        "pods": [],
    }


N1 = dump(
    "n1",
    [
        {
            "identity": "spiffe://cluster.local/ns/travel/sa/frontend",
            "serial": "1a2b",
            "notBefore": "2026-01-01T00:00:00Z",
            "notAfter": "2026-01-02T00:00:00Z",
            "state": "valid",
        }
    ],
)
N2 = dump("n2", [{"identity": "spiffe://cluster.local/ns/travel/sa/bookings", "state": "pending"}])
CONN = {
    "direction": "outbound",
    "pod": "travel/frontend",
    "src": "10.244.1.10:40000",
    "dst": "10.244.2.20:9000",
    "hbone": "10.244.2.20:15008",
    "srcIdentity": "spiffe://cluster.local/ns/travel/sa/frontend",
    "dstIdentity": "spiffe://cluster.local/ns/travel/sa/bookings",
    "bytesSent": 1234,
    "bytesReceived": 56789,
    "startedAt": 1000.0,
}
EXPLAIN: dict[str, Any] = {
    "source": {
        "workload": "travel/frontend",
        "identity": "spiffe://cluster.local/ns/travel/sa/frontend",
        "ip": "10.244.1.10",
    },
    "destination": {
        "input": "bookings:80",
        "ip": "10.96.0.20",
        "port": 80,
        "service": "travel/bookings.travel.svc.cluster.local",
    },
    "route": "HBONE",
    "reason": "service VIP: an endpoint in the mesh",
    "selection": "one of 2 healthy endpoints, chosen at random per connection",
    "endpoints": [
        {
            "workload": "travel/bookings-1",
            "ip": "10.244.2.20",
            "port": 9000,
            "hbone": "10.244.2.20:15008",
            "identity": "spiffe://cluster.local/ns/travel/sa/bookings",
            "node": "n2",
            "healthy": True,
            "authorization": {
                "allowed": True,
                "policy": "travel/allow-frontend",
                "rule": 0,
                "action": "ALLOW",
                "reason": "allowed by travel/allow-frontend rule 0",
                "dryRun": [],
            },
            "mtls": "STRICT",
        },
        {
            "workload": "travel/bookings-3",
            "ip": "10.244.3.20",
            "port": 9000,
            "hbone": "10.244.3.20:15008",
            "identity": "spiffe://cluster.local/ns/travel/sa/bookings",
            "node": "n3",
            "healthy": True,
            "authorization": {
                "allowed": False,
                "policy": "travel/deny-all",
                "rule": None,
                "action": "DENY",
                "reason": "denied: no ALLOW policy matched",
                "dryRun": [
                    {"policy": "travel/deny-get", "action": "DENY", "matched": True, "rule": 0}
                ],
            },
            "mtls": "PERMISSIVE",
        },
    ],
}


def rows(text: str) -> list[list[str]]:
    """A table's lines split on runs of two or more spaces."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines() if line.strip()]


def column(text: str, header: str) -> list[str]:
    table = rows(text)
    i = table[0].index(header)
    return [r[i] for r in table[1:]]


def static_getter(answers: dict[tuple[str, str], Any]) -> views.Getter:
    def get(node: str, path: str) -> tuple[int, bytes]:
        key = (node, path.split("?")[0])
        if key not in answers:
            raise ConnectionRefusedError(111, "Connection refused")
        return 200, json.dumps(answers[key]).encode()

    return get


# -- tables ---------------------------------------------------------------------------------


def test_table_aligns_columns_under_upper_case_headers():
    text = views.table(["NAME", "ADDRESS"], [["a", "10.0.0.1"], ["longer-name", "x"]])
    lines = text.splitlines()
    assert lines[0].index("ADDRESS") == lines[1].index("10.0.0.1") == lines[2].index("x")
    assert all(line == line.rstrip() for line in lines)


def test_workloads_are_listed_once_across_nodes():
    data = views.collect_workloads({"n1": N1, "n2": N2})
    text = views.render_workloads(data)
    assert rows(text)[0] == ["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"]
    assert column(text, "POD NAME") == ["db", "bookings-1", "bookings-2", "frontend"]
    assert rows(text)[1] == [
        "legacy",
        "db",
        "10.244.1.30",
        "n1",
        "travel/waypoint.travel.svc.cluster.local",
        "TCP",
    ]
    assert rows(text)[4] == ["travel", "frontend", "10.244.1.10", "n1", "None", "HBONE"]


def test_services_count_healthy_endpoints():
    text = views.render_services(views.collect_services({"n1": N1, "n2": N2}))
    assert rows(text) == [
        ["NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS"],
        # bookings-2 is unhealthy and travel/gone is not a workload the dump knows.
        ["travel", "bookings", "10.96.0.20", "None", "1/3"],
    ]


def test_policies_with_dry_run_warnings_peer_authentication_and_rejections():
    text = views.render_policies(views.collect_policies({"n1": N1, "n2": N2}))
    table, _, rest = text.partition("\n\n")
    assert rows(table) == [
        ["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE", "DRY-RUN"],
        ["travel", "allow-frontend", "ALLOW", "WorkloadSelector (app=bookings)", "no"],
        ["travel", "deny-get", "DENY", "Namespace", "yes"],
    ]
    assert "strict" in rest and "STRICT" in rest and "8080:PERMISSIVE" in rest
    assert "Warnings:\n  travel/deny-get: rule 0: methods is an HTTP field" in text
    # Merged from both nodes, yet listed once.
    assert text.count("travel/broken: rules[0].from: not a list") == 1
    assert "Rejected (not applied):" in text


def test_certificates_are_tagged_with_their_node_and_tolerate_pending_ones():
    data = views.collect_certificates({"n1": N1, "n2": N2})
    text = views.render_certificates(data, with_node=True)
    assert rows(text)[0] == [
        "NODE",
        "CERTIFICATE NAME",
        "TYPE",
        "SERIAL",
        "NOT BEFORE",
        "NOT AFTER",
        "STATE",
    ]
    assert rows(text)[1] == [
        "n1",
        "spiffe://cluster.local/ns/travel/sa/frontend",
        "Leaf",
        "1a2b",
        "2026-01-01T00:00:00Z",
        "2026-01-02T00:00:00Z",
        "valid",
    ]
    assert rows(text)[2] == [
        "n2",
        "spiffe://cluster.local/ns/travel/sa/bookings",
        "Leaf",
        "-",
        "-",
        "-",
        "pending",
    ]
    single = views.render_certificates(views.collect_certificates({"n1": N1}), with_node=False)
    assert rows(single)[0][0] == "CERTIFICATE NAME"


def test_connections_show_bytes_and_age():
    data = views.collect_connections({"n1": [CONN], "n2": [{**CONN, "startedAt": 900.0}]})
    text = views.render_connections(data, now=1000.0 + 3 * 60 + 12)
    assert rows(text)[0] == [
        "NODE",
        "DIRECTION",
        "POD",
        "SOURCE",
        "DESTINATION",
        "SOURCE IDENTITY",
        "DESTINATION IDENTITY",
        "SENT",
        "RECEIVED",
        "AGE",
    ]
    # Oldest first.
    assert column(text, "NODE") == ["n2", "n1"]
    assert column(text, "AGE") == ["4m52s", "3m12s"]
    assert rows(text)[2][1:9] == [
        "outbound",
        "travel/frontend",
        "10.244.1.10:40000",
        "10.244.2.20:9000",
        "spiffe://cluster.local/ns/travel/sa/frontend",
        "spiffe://cluster.local/ns/travel/sa/bookings",
        "1234",
        "56789",
    ]


@pytest.mark.parametrize(
    ("seconds", "want"),
    [(0, "0s"), (59, "59s"), (60, "1m0s"), (3599, "59m59s"), (7500, "2h5m"), (266400, "3d2h")],
)
def test_age_reads_like_kubectl(seconds, want):
    assert views.age(seconds) == want


def test_renderers_tolerate_missing_keys_and_odd_entries():
    odd: dict[str, Any] = {
        "workloads": [{}, "not an entry", {"name": "x"}],
        "services": [{"name": "s", "vips": "oops", "endpoints": None}],
        "policies": [{"name": "p", "warnings": "not a list"}],
        "certificates": [{}],
        "policyErrors": "not a list",
    }
    for text in (
        views.render_workloads(views.collect_workloads({"n1": odd, "n2": None})),
        views.render_services(views.collect_services({"n1": odd})),
        views.render_policies(views.collect_policies({"n1": odd})),
        views.render_certificates(views.collect_certificates({"n1": odd})),
        views.render_connections(views.collect_connections({"n1": [{}, 3]})),
        views.render_explain({}),
        views.render_explain({"endpoints": [{"authorization": "odd"}], "source": "odd"}),
    ):
        assert text.endswith("\n")
    assert rows(views.render_workloads(views.collect_workloads({"n1": odd})))[1:] == [
        ["-", "-", "-", "-", "None", "-"],
        ["-", "x", "-", "-", "None", "-"],
    ]
    assert rows(views.render_services(views.collect_services({"n1": odd})))[1][-1] == "0/0"


# -- explain --------------------------------------------------------------------------------


def test_explain_reads_as_route_reason_and_a_verdict_per_endpoint():
    text = views.render_explain(EXPLAIN)
    assert "Source:       travel/frontend (spiffe://cluster.local/ns/travel/sa/frontend)" in text
    assert (
        "Destination:  bookings:80 -> 10.96.0.20:80 "
        "(service travel/bookings.travel.svc.cluster.local)" in text
    )
    assert "Route:        HBONE" in text
    assert "Reason:       service VIP: an endpoint in the mesh" in text
    assert "Selection:    one of 2 healthy endpoints" in text
    first, second = text.split("  - ")[1:]
    assert first.startswith("travel/bookings-1 at 10.244.2.20:9000")
    assert "identity:       spiffe://cluster.local/ns/travel/sa/bookings" in first
    assert "node:           n2" in first
    assert "hbone:          10.244.2.20:15008" in first
    assert "authorization:  ALLOWED by policy travel/allow-frontend rule 0 (ALLOW)" in first
    assert "mtls:           STRICT" in first
    assert "authorization:  DENIED by policy travel/deny-all (DENY)" in second
    assert "reason:       denied: no ALLOW policy matched" in second
    assert (
        "dry-run:      DENY policy travel/deny-get would match (rule 0): the connection "
        "would be denied" in second
    )
    assert "mtls:           PERMISSIVE" in second


def test_explain_of_a_refused_route_has_no_endpoints():
    doc = {**EXPLAIN, "route": "REFUSE", "reason": "self-call to a tunnel port", "endpoints": []}
    text = views.render_explain(doc)
    assert "Route:        REFUSE" in text
    assert "Endpoints:    none" in text


# -- fetching and -o json -------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(views.VIEWS))
def test_json_output_round_trips(kind):
    answers = {
        ("n1", "/config_dump"): N1,
        ("n2", "/config_dump"): N2,
        ("n1", "/connections"): [CONN],
        ("n2", "/connections"): [],
    }
    before = copy.deepcopy(answers)
    out = views.show(kind, static_getter(answers), ["n1", "n2"], "json")
    path, collect, _ = views.VIEWS[kind]
    assert json.loads(out) == collect({"n1": answers[("n1", path)], "n2": answers[("n2", path)]})
    assert answers == before  # collecting does not change what was fetched
    table = views.show(kind, static_getter(answers), ["n1", "n2"], "table")
    assert table.splitlines()[0].isupper()


def test_explain_json_round_trips():
    out = views.explain(
        static_getter({("n1", "/debug/explain"): EXPLAIN}),
        "n1",
        "travel/frontend",
        "bookings:80",
        "json",
    )
    assert json.loads(out) == EXPLAIN


def test_unreachable_admin_port_names_the_node_and_what_to_check():
    with pytest.raises(views.AdminUnreachable, match="is the tunnel on node n2 running") as e:
        views.show(
            "workloads",
            static_getter({("n1", "/config_dump"): N1}),
            ["n1", "n2"],
            "table",
            hint="(see: ambientctl status c.yaml)",
        )
    assert "ambientctl status c.yaml" in str(e.value)


def loopback_getter(port: int) -> views.Getter:
    """A real HTTP/1.0 client to 127.0.0.1:port (the CLI does the same inside a node netns)."""

    def get(node: str, path: str) -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body

    return get


class DumpSource:
    def config_dump(self) -> dict[str, Any]:
        return N1

    def connections(self) -> list[dict[str, Any]]:
        return [CONN]

    def explain(self, source: str, destination: str) -> dict[str, Any]:
        if source != "travel/frontend":
            raise ValueError(f"no workload {source} in the mesh config")
        return {**EXPLAIN, "destination": {**EXPLAIN["destination"], "input": destination}}

    def request_quit(self) -> None:
        raise AssertionError("views never ask a tunnel to quit")


def test_views_from_a_real_admin_server_with_a_static_source():
    async def main() -> tuple[str, str, str, str]:
        server = AdminServer(DumpSource(), port=0, host="127.0.0.1")
        await server.start()
        get = loopback_getter(server.port)
        try:
            workloads = await asyncio.to_thread(views.show, "workloads", get, ["n1"], "table")
            conns = await asyncio.to_thread(views.show, "connections", get, ["n1"], "json")
            explained = await asyncio.to_thread(
                views.explain, get, "n1", "travel/frontend", "bookings.travel:80", "table"
            )
            try:
                await asyncio.to_thread(
                    views.explain, get, "n1", "travel/ghost", "bookings:80", "table"
                )
            except views.ViewError as e:
                bad = str(e)
            else:
                bad = ""
        finally:
            await server.close()
        return workloads, conns, explained, bad

    workloads, conns, explained, bad = asyncio.run(asyncio.wait_for(main(), 30))
    assert column(workloads, "POD NAME") == ["db", "bookings-1", "bookings-2", "frontend"]
    assert json.loads(conns) == [{**CONN, "node": "n1"}]
    # The query string reached the tunnel intact.
    assert "Destination:  bookings.travel:80 -> 10.96.0.20:80" in explained
    assert bad == "node n1: no workload travel/ghost in the mesh config"


def test_explain_path_quotes_its_arguments():
    assert views.explain_path("travel/frontend", "[fd00::1]:80") == (
        "/debug/explain?source=travel%2Ffrontend&destination=%5Bfd00%3A%3A1%5D%3A80"
    )


# -- command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["workloads", "services", "policies", "certificates", "connections"]
)
def test_view_commands_parse(kind):
    args = build_parser().parse_args([kind, "c.yaml", "--node", "n1", "-o", "json"])
    assert (args.cmd, args.cluster_file, args.node, args.output) == (kind, "c.yaml", "n1", "json")
    args = build_parser().parse_args([kind, "c.yaml"])
    assert (args.node, args.output) == (None, "table")


def test_explain_command_parses():
    args = build_parser().parse_args(["explain", "c.yaml", "travel/frontend", "bookings:80"])
    assert (args.source, args.destination, args.node, args.output) == (
        "travel/frontend",
        "bookings:80",
        None,
        "table",
    )


def test_bad_output_format_is_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["workloads", "c.yaml", "-o", "yaml"])
