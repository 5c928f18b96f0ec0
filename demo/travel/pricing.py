"""pricing: quotes a price for one flight.

`GET /quote?flight=KL1234` -> {flight, price, currency, served_by, node, seen_client, hop}.
The price is a pure function of the flight code (SHA-256, not Python's salted hash()), so
every replica, every run and every test agrees on it.

`--fail-every N` makes a deliberately flaky replica: every Nth quote is answered with a TCP
reset instead of a response (what a crashing worker looks like to its caller), so the
demo can show a retry policy hiding it.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from travel_common import (
    BadRequest,
    Handler,
    PodIdentity,
    Request,
    Response,
    hop,
    parse_args,
    serve,
)

APP = "pricing"
CURRENCY = "EUR"
FLIGHT_CODE = re.compile(r"^[A-Z0-9]{2}[0-9]{1,4}$")
# Prices land in [MIN_CENTS, MIN_CENTS + SPREAD_CENTS): plausible short-haul fares.
MIN_CENTS = 4_900
SPREAD_CENTS = 40_000


def quote_cents(flight: str) -> int:
    """The deterministic price of `flight`, in cents."""
    digest = hashlib.sha256(flight.encode("ascii")).digest()
    return MIN_CENTS + int.from_bytes(digest[:8], "big") % SPREAD_CENTS


def validate_flight(flight: str) -> str:
    code = flight.strip().upper()
    if not FLIGHT_CODE.match(code):
        raise BadRequest(f"flight {flight!r} is not a flight code like KL1234")
    return code


def routes(me: PodIdentity) -> Mapping[str, Handler]:
    def quote(req: Request) -> Response:
        flight = validate_flight(req.param("flight"))
        cents = quote_cents(flight)
        body: dict[str, Any] = {
            "flight": flight,
            "price": cents / 100,
            "currency": CURRENCY,
            "served_by": me.name,
            "node": me.node,
            "seen_client": req.client_ip,
            "hop": hop(APP, me, req),
        }
        return Response(200, body)

    return {"/quote": quote}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(APP, argv, fail_every=True)
    me = PodIdentity.from_env(os.environ)
    return serve(APP, routes(me), args.host, args.port, args.fail_every)


if __name__ == "__main__":
    sys.exit(main())
