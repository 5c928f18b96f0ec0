"""frontend: books the cheapest flight on a route.

`GET /book?from=AMS&to=LIS` calls flights' `/search`, picks the cheapest flight (ties go to
the lower flight code, so the choice is deterministic) and answers {from, to, booking,
chain}, where chain is the whole path of the request:
[{service: frontend, ...}, {service: flights, ...}, {service: pricing, ...}], each hop naming
the pod that served it, its node, and the client address that pod saw. The chain is what
the demo shows: which node served what, and whether the source address survived the trip.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from travel_common import (
    BadRequest,
    ConfigError,
    DownstreamError,
    Fetch,
    Handler,
    PodIdentity,
    Request,
    Response,
    ServiceAddress,
    hop,
    http_fetch,
    parse_args,
    serve,
)

APP = "frontend"


def cheapest(search: Mapping[str, Any]) -> dict[str, Any]:
    """The flight to book from flights' answer; a malformed answer is flights' fault."""
    options = search.get("flights")
    if not isinstance(options, list) or not options:
        raise DownstreamError("flights", f"search returned no flights: {dict(search)!r}")
    for option in options:
        if not isinstance(option, dict) or not isinstance(option.get("price"), int | float):
            raise DownstreamError("flights", f"malformed flight in search: {option!r}")
    best: dict[str, Any] = min(options, key=lambda f: (f["price"], str(f.get("flight"))))
    return best


def routes(me: PodIdentity, flights: ServiceAddress, fetch: Fetch) -> Mapping[str, Handler]:
    def book(req: Request) -> Response:
        query = {"from": req.param("from"), "to": req.param("to")}
        try:
            search = fetch(flights, "/search", query)
        except DownstreamError as exc:
            # Validating the route is flights' job; its 400 is the caller's mistake, so the
            # caller gets a 400 with flights' own message rather than a 502.
            if exc.status == 400 and exc.cause is not None:
                raise BadRequest(str(exc.cause.get("error", exc.reason))) from None
            raise
        best = cheapest(search)
        flights_hop, pricing_hop = search.get("hop"), best.get("pricing")
        if not isinstance(flights_hop, dict) or not isinstance(pricing_hop, dict):
            raise DownstreamError("flights", "search answer lacks the hop information")
        body: dict[str, Any] = {
            "from": search.get("from"),
            "to": search.get("to"),
            "booking": {k: best[k] for k in ("flight", "price", "currency") if k in best},
            "chain": [hop(APP, me, req), flights_hop, pricing_hop],
        }
        return Response(200, body)

    return {"/book": book}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(APP, argv)
    me = PodIdentity.from_env(os.environ)
    try:
        flights = ServiceAddress.from_env("flights", os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"{APP}: {exc}\n")
        return 2
    return serve(APP, routes(me, flights, http_fetch(args.timeout)), args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
