"""A pod's app for the kubelet tests: listens only after a delay, answers with its pod name.

`slowapp.py PORT DELAY_S`: GET /healthz -> 200 "ok", any other path -> 200 "$POD_NAME"
(or "$HOSTNAME"); SIGTERM ends it at once.
"""

from __future__ import annotations

import http.server
import os
import signal
import sys
import time


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        # POD_NAME when the manifest sets it, else HOSTNAME (the kubelet sets it to the pod's).
        name = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME", "")
        body = b"ok" if self.path == "/healthz" else name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    port, delay = int(sys.argv[1]), float(sys.argv[2])
    time.sleep(delay)
    http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
