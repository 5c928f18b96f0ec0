"""Builders shared by the route tests: services, request facts, tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from meshcore.state import Service, ServicePort
from waypoint.routes.facts import RequestFacts
from waypoint.routes.table import RouteTable

CONFORMANCE = Path(__file__).parent / "conformance"
MESH_NS = "gateway-conformance-mesh"


def service(name: str, namespace: str = "default", ports: tuple[int, ...] = (80,)) -> Service:
    return Service(
        name=name,
        namespace=namespace,
        hostname=f"{name}.{namespace}.svc.cluster.local",
        vips=(),
        ports=tuple(ServicePort(p, p) for p in ports),
        subject_alt_names=(),
        waypoint=None,
    )


def key(name: str, namespace: str = "default") -> str:
    return f"{namespace}/{name}.{namespace}.svc.cluster.local"


# The conformance suite's mesh: echo and its versions, HTTP on 80 and 8080, gRPC on 7070.
MESH_SERVICES = tuple(
    service(n, MESH_NS, (80, 8080, 7070)) for n in ("echo", "echo-v1", "echo-v2", "echo-v3")
)


def facts(
    path: str = "/",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    authority: str = "echo",
    **kw: Any,
) -> RequestFacts:
    hs = tuple((k.lower(), v) for k, v in (headers or {}).items())
    return RequestFacts(method=method, path=path, headers=hs, authority=authority, **kw)


def conformance_table(name: str) -> RouteTable:
    docs = list(yaml.safe_load_all((CONFORMANCE / f"{name}.yaml").read_text()))
    table = RouteTable.build(docs, MESH_SERVICES)
    bad = [s for s in table.statuses() if not s.accepted]
    assert not bad, bad
    return table


def http_route(*rules: dict[str, Any], name: str = "r", ns: str = "default",
               parent: str = "svc", created: str | None = None,
               hostnames: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if created:
        meta["creationTimestamp"] = created
    spec: dict[str, Any] = {
        "parentRefs": [{"group": "", "kind": "Service", "name": parent}],
        "rules": list(rules),
    }
    if hostnames:
        spec["hostnames"] = hostnames
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": meta, "spec": spec}  # fmt: skip
