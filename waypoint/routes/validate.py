"""`validate_resource`: is a routing document usable? `ambientctl apply -f` asks before
anything is written, so a bad resource is refused whole."""

from __future__ import annotations

from typing import Any

from waypoint.routes.destinationrule import parse_destination_rule
from waypoint.routes.document import API_VERSIONS, RouteConfigErrors, read_meta
from waypoint.routes.gateway import parse_route
from waypoint.routes.table import RouteTable
from waypoint.routes.values import RouteConfigError, reader
from waypoint.routes.virtualservice import parse_virtual_service

KINDS = tuple(API_VERSIONS)


def validate_resource(doc: Any) -> list[str]:
    """Every error found in `doc` (each naming its field path); empty when it is valid.

    Never raises for any decoded YAML/JSON value: a parser bug surfaces as an error message
    rather than a crash of the caller.
    """
    try:
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if kind in ("HTTPRoute", "GRPCRoute"):
            parse_route(doc)
        elif kind == "VirtualService":
            parse_virtual_service(doc)
        elif kind == "DestinationRule":
            parse_destination_rule(doc)
        elif kind == "ReferenceGrant":
            status = RouteTable.build([doc], ()).statuses()
            return [e for s in status for e in s.errors]
        else:
            read_meta(reader(), doc, KINDS)  # words the error about kind/apiVersion/metadata
            return [f"kind: {kind!r} is not one of {', '.join(KINDS)}"]
    except RouteConfigErrors as exc:
        return list(exc.messages)
    except RouteConfigError as exc:
        return [str(exc)]
    except RecursionError:
        return ["the document is nested too deeply"]
    return []
