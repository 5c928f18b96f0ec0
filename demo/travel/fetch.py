"""fetch: a tiny stdlib HTTP client, for sending demo requests from inside a pod.

`python travel/fetch.py http://10.96.0.10/book?from=AMS&to=LIS [--timeout 5] [--method POST]`
prints the response body to stdout and exits 0 on a 2xx answer, 1 on another status, 2 when
the call fails (refused, reset, timed out), with the reason on stderr.

`--count N` sends N requests one after another (each on a new connection, so each is
routed and balanced afresh) and prints one JSON line per request instead of a body:
{"status": 200, "served_by": "<X-Served-By header>", "error": null}; status is null when
the call failed. It stops early at `--deadline` seconds, so a slow mesh cannot hold the
caller: the number of lines says how many were sent. The exit code is the worst outcome.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

SERVED_BY_HEADER = "X-Served-By"  # travel_common sets it on every answer


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive count")
    return value


def one(
    opener: urllib.request.OpenerDirector, url: str, method: str, timeout: float
) -> tuple[int | None, str, str | None, str]:
    """(status or None, body, served_by, error text): one request, never raising."""
    data = b"" if method in ("POST", "PUT", "PATCH") else None
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with opener.open(req, timeout=timeout) as resp:
            body = resp.read().decode("utf-8", "replace")
            return resp.status, body, resp.headers.get(SERVED_BY_HEADER), ""
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8", "replace")
        return exc.code, body, exc.headers.get(SERVED_BY_HEADER), ""
    except (OSError, ValueError) as exc:
        return None, "", None, f"{method} {url} failed: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fetch", description="HTTP request a URL, print the body")
    parser.add_argument("url")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument("--method", default="GET", type=str.upper, help="(default GET)")
    parser.add_argument("--count", type=_positive, default=None, help="send N requests")
    parser.add_argument(
        "--deadline", type=float, default=60.0, help="with --count: stop after S seconds"
    )
    args = parser.parse_args(argv)
    # No proxies from the environment: the request must take the pod's own network path.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    if args.count is None:
        status, body, _, error = one(opener, args.url, args.method, args.timeout)
        if status is None:
            sys.stderr.write(f"fetch: {error}\n")
            return 2
        sys.stdout.write(body)
        if 200 <= status < 300:
            return 0
        sys.stderr.write(f"fetch: {args.url} answered {status}\n")
        return 1
    worst = 0
    stop_at = time.monotonic() + args.deadline
    for _ in range(args.count):
        if time.monotonic() >= stop_at:
            break
        status, _, served_by, error = one(opener, args.url, args.method, args.timeout)
        line: dict[str, Any] = {"status": status, "served_by": served_by, "error": error or None}
        sys.stdout.write(json.dumps(line) + "\n")
        worst = max(worst, 2 if status is None else 0 if 200 <= status < 300 else 1)
    return worst


if __name__ == "__main__":
    sys.exit(main())
