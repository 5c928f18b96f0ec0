"""The waypoint's route parsers (waypoint.routes): HTTPRoute, GRPCRoute, VirtualService and
DestinationRule documents of a YAML stream, and the route table built from them.

Contract: each document parser raises RouteConfigError and nothing else; `RouteTable.build`
never raises (a document that does not parse gets a status, the rest still route).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import yaml

from fuzz.targets import samples
from meshcore.discovery import parse_local_config
from meshcore.reader import load_documents
from waypoint.routes.destinationrule import parse_destination_rule
from waypoint.routes.gateway import parse_route
from waypoint.routes.table import RouteTable
from waypoint.routes.values import RouteConfigError
from waypoint.routes.virtualservice import parse_virtual_service

_SERVICES = parse_local_config(json.dumps(samples.config(policies=[]))).services
_PARSERS: dict[str, Callable[[Any], object]] = {
    "HTTPRoute": parse_route,
    "GRPCRoute": parse_route,
    "VirtualService": parse_virtual_service,
    "DestinationRule": parse_destination_rule,
}


def test_one_input(data: bytes) -> None:
    try:
        docs = load_documents(data.decode("utf-8", "replace"), RouteConfigError)
    except RouteConfigError:
        return
    for doc in docs:
        kind = doc.get("kind") if isinstance(doc, dict) else None
        parse = _PARSERS.get(kind) if isinstance(kind, str) else None
        if parse is None:
            continue
        with contextlib.suppress(RouteConfigError):
            parse(doc)
    table = RouteTable.build(docs, _SERVICES, gateway=("travel", "waypoint"))
    table.statuses()


def seeds() -> dict[str, bytes]:
    out = {f"route-{i}": samples.text(r) for i, r in enumerate(samples.ROUTES)}
    out["stream"] = yaml.safe_dump_all(samples.ROUTES).encode()
    return out
