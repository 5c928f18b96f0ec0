"""flights: lists the flights on a route, each priced by the pricing service.

`GET /search?from=AMS&to=LIS` -> {from, to, flights: [{flight, price, currency, pricing}],
served_by, node, seen_client, hop}. The flights on a route are a pure function of the route;
the prices come from pricing's `/quote`, called concurrently (one call per flight), and each
flight keeps the pricing hop that priced it. Any failed quote fails the whole search with 502
naming pricing: a half-priced list would be wrong, not partial.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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

APP = "flights"
AIRPORT = re.compile(r"^[A-Z]{3}$")
CARRIERS = ("KL", "TP", "HV", "U2", "FR")
FLIGHTS_PER_ROUTE = 3


def airport(req: Request, key: str) -> str:
    code = req.param(key).strip().upper()
    if not AIRPORT.match(code):
        raise BadRequest(f"{key}={req.query[key]!r} is not a three-letter airport code like AMS")
    return code


def flights_on(origin: str, dest: str) -> list[str]:
    """The flight codes on a route: deterministic, distinct, FLIGHTS_PER_ROUTE of them."""
    codes: list[str] = []
    salt = 0
    while len(codes) < FLIGHTS_PER_ROUTE:
        digest = hashlib.sha256(f"{origin}-{dest}-{salt}".encode("ascii")).digest()
        salt += 1
        carrier = CARRIERS[digest[0] % len(CARRIERS)]
        code = f"{carrier}{100 + int.from_bytes(digest[1:3], 'big') % 9000}"
        if code not in codes:
            codes.append(code)
    return codes


def priced(flight: str, quote: Mapping[str, Any]) -> dict[str, Any]:
    """One priced flight from pricing's answer; a malformed answer is pricing's fault."""
    price, currency, pricing_hop = quote.get("price"), quote.get("currency"), quote.get("hop")
    if not isinstance(price, int | float) or not isinstance(currency, str):
        raise DownstreamError("pricing", f"malformed quote for {flight}: {dict(quote)!r}")
    if not isinstance(pricing_hop, dict):
        raise DownstreamError("pricing", f"quote for {flight} carries no hop")
    return {"flight": flight, "price": price, "currency": currency, "pricing": pricing_hop}


def routes(me: PodIdentity, pricing: ServiceAddress, fetch: Fetch) -> Mapping[str, Handler]:
    def search(req: Request) -> Response:
        origin, dest = airport(req, "from"), airport(req, "to")
        if origin == dest:
            raise BadRequest(f"from and to are both {origin}")
        codes = flights_on(origin, dest)
        # Concurrent quotes: the search costs one pricing round trip, not one per flight,
        # and stays well inside the caller's own timeout.
        with ThreadPoolExecutor(max_workers=len(codes), thread_name_prefix="quote") as pool:
            quotes = list(pool.map(lambda c: fetch(pricing, "/quote", {"flight": c}), codes))
        body: dict[str, Any] = {
            "from": origin,
            "to": dest,
            "flights": [priced(c, q) for c, q in zip(codes, quotes, strict=True)],
            "served_by": me.name,
            "node": me.node,
            "seen_client": req.client_ip,
            "hop": hop(APP, me, req),
        }
        return Response(200, body)

    return {"/search": search}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(APP, argv)
    me = PodIdentity.from_env(os.environ)
    try:
        pricing = ServiceAddress.from_env("pricing", os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"{APP}: {exc}\n")
        return 2
    return serve(APP, routes(me, pricing, http_fetch(args.timeout)), args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
