"""fetch: a tiny stdlib HTTP GET client, for sending demo requests from inside a pod.

`python travel/fetch.py http://10.96.0.10/book?from=AMS&to=LIS [--timeout 5]` prints the
response body to stdout and exits 0 on a 2xx answer, 1 on another status, 2 when the call
fails (refused, reset, timed out), with the reason on stderr.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fetch", description="HTTP GET a URL, print the body")
    parser.add_argument("url")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    args = parser.parse_args(argv)
    # No proxies from the environment: the request must take the pod's own network path.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(args.url, timeout=args.timeout) as resp:
            sys.stdout.write(resp.read().decode("utf-8", "replace"))
            return 0
    except urllib.error.HTTPError as exc:
        sys.stdout.write(exc.read().decode("utf-8", "replace"))
        sys.stderr.write(f"fetch: {args.url} answered {exc.code}\n")
        return 1
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"fetch: GET {args.url} failed: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
