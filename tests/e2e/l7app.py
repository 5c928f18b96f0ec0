"""The HTTP app of the waypoint end-to-end tests, run inside pods (keep-alive HTTP/1.1).

`python l7app.py NAME [--fail]`. Port 8080 answers every request with JSON naming the app,
the method, the target, the headers it got and its client's address (plus `x-served-by`
and `x-app-internal` response headers); `--fail` answers 500 to everything (a broken
replica). Paths with a meaning:
  /delay/<ms>...  wait that long first (at most 10 s)
  /flaky...       every third such request has its connection reset instead of an answer
  /reset...       the connection is reset, always
Port 2525 speaks a server-first protocol like SMTP's: `220 NAME ready` before reading
anything, then `250 <line>` for each line, `221 bye` and close on `QUIT`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = sys.argv[1] if len(sys.argv) > 1 else "app"
FAIL = "--fail" in sys.argv
_flaky = [0]
_flaky_lock = threading.Lock()


def _reset(conn: socket.socket) -> None:
    # SO_LINGER 0: close sends RST, as a crashing backend's kernel does.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would drown the pod's log

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(min(length, 1 << 20)) if length else b""
        path = self.path
        if path.startswith("/reset"):
            self.close_connection = True
            _reset(self.connection)
            return
        if path.startswith("/flaky"):
            with _flaky_lock:
                _flaky[0] += 1
                doomed = _flaky[0] % 3 == 0
            if doomed:
                self.close_connection = True
                _reset(self.connection)
                return
        if path.startswith("/delay/"):
            ms = int("".join(c for c in path[7:].split("/")[0].split("?")[0] if c.isdigit()) or 0)
            time.sleep(min(ms, 10_000) / 1000)
        info = {
            "app": NAME,
            "method": self.command,
            "path": path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "client": self.client_address[0],
            "body": len(body),
        }
        data = json.dumps(info).encode()
        self.send_response(500 if FAIL else 200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("x-served-by", NAME)
        self.send_header("x-app-internal", "secret")
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def finish(self) -> None:
        with contextlib.suppress(OSError):  # the connection was reset on purpose
            super().finish()


def greeter(conn: socket.socket) -> None:
    with conn:
        conn.sendall(f"220 {NAME} ready\r\n".encode())
        f = conn.makefile("rb")
        while line := f.readline(1024):
            text = line.decode(errors="replace").rstrip("\r\n")
            if text.upper() == "QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            conn.sendall(f"250 {text}\r\n".encode())


def serve_greeter() -> None:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 2525))
    s.listen(64)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=greeter, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    threading.Thread(target=serve_greeter, daemon=True).start()
    server = ThreadingHTTPServer(("0.0.0.0", 8080), Handler)
    server.daemon_threads = True
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)
