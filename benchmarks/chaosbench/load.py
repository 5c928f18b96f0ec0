"""The chaos benchmark's load, run inside the client pod's netns (a child process that
entered it): new connections at a fixed pace plus long-lived ones, on two paths at once.

- `l4`: the plain path, a TCP echo through both tunnels (`--l4 HOST:PORT`);
- `l7`: HTTP/1.1 POSTs through the waypoint (`--l7 HOST:PORT`).

Every payload carries `--marker`, the bytes a capture on the node link must never show.
Each path starts one new connection every `--interval-ms` (one full round trip, then close)
and `--long` connections kept for the whole run (one round trip every 100 ms; a connection
that breaks is counted lost, never reopened). Runs until SIGTERM or `--max-seconds`, and at
most MAX_ATTEMPTS attempts per path; then prints one JSON document on stdout:
{"attempts": {path: [[began, ended, ok, error], ...]}, "long": {path: [{...}, ...]}}
with wall-clock times (time.time()), so the caller can line them up with its own events.
"""

from __future__ import annotations

import argparse
import faulthandler
import http.client
import json
import signal
import socket
import threading
import time
from typing import Any

MAX_ATTEMPTS = 20_000  # per path
# Attempts of one path at once: at 20 ms and a 2 s timeout an outage holds about 100.
MAX_IN_FLIGHT = 256
LONG_PERIOD = 0.1  # seconds between two round trips of a long-lived connection


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def l4_once(addr: tuple[str, int], payload: bytes, timeout: float) -> None:
    """One echo round trip on a new connection; raises OSError (or ValueError) if it fails."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        if got != payload:
            raise ValueError(f"echo was {got[:40]!r}")


def l7_request(conn: http.client.HTTPConnection, payload: bytes, marker: str) -> None:
    conn.request("POST", "/chaos", body=payload, headers={"x-chaos-marker": marker})
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200 or body != payload:
        raise ValueError(f"answer {resp.status} {body[:40]!r}")


def l7_once(addr: tuple[str, int], payload: bytes, marker: str, timeout: float) -> None:
    conn = http.client.HTTPConnection(addr[0], addr[1], timeout=timeout)
    try:
        l7_request(conn, payload, marker)
    finally:
        conn.close()


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:160]


def new_connections(
    path: str,
    addr: tuple[str, int],
    marker: str,
    interval: float,
    timeout: float,
    stop: threading.Event,
    out: list[list[Any]],
) -> None:
    """One attempt started every `interval`, each in its own thread, so a slow or hanging
    attempt does not slow the pace; at most MAX_IN_FLIGHT at once (an attempt due beyond
    that is recorded as failed, not made)."""
    slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)

    def attempt(n: int) -> None:
        payload = f"{marker} {path} new {n}\n".encode()
        began = time.time()
        error = None
        try:
            if path == "l4":
                l4_once(addr, payload, timeout)
            else:
                l7_once(addr, payload, marker, timeout)
        except (OSError, ValueError, http.client.HTTPException) as e:
            error = _error(e)
        finally:
            slots.release()
        out.append([round(began, 4), round(time.time(), 4), error is None, error])

    next_at = time.monotonic()
    n = 0
    while not stop.is_set() and n < MAX_ATTEMPTS:
        n += 1
        if slots.acquire(blocking=False):
            threading.Thread(target=attempt, args=(n,), daemon=True).start()
        else:
            now = round(time.time(), 4)
            # The load's own limit, not the mesh's answer: verdict.NOT_MADE leaves it out.
            out.append([now, now, False, f"not made: {MAX_IN_FLIGHT} attempts in flight"])
        next_at += interval
        stop.wait(max(0.0, next_at - time.monotonic()))
    # The attempts in flight end within their timeouts: take every slot back.
    deadline = time.monotonic() + timeout * 3 + 5
    for _ in range(MAX_IN_FLIGHT):
        if not slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            break
    out.sort(key=lambda row: float(row[0]))


def long_lived(
    path: str,
    addr: tuple[str, int],
    marker: str,
    timeout: float,
    stop: threading.Event,
    out: dict[str, Any],
) -> None:
    rounds = 0
    out.update(ok=False, rounds=0, opened=time.time())
    try:
        if path == "l4":
            s = socket.create_connection(addr, timeout=timeout)
            with s:
                while not stop.is_set():
                    msg = f"{marker} l4 long {rounds:06d}\n".encode()
                    s.sendall(msg)
                    got = b""
                    while len(got) < len(msg):
                        chunk = s.recv(len(msg) - len(got))
                        if not chunk:
                            raise ConnectionError("closed by peer")
                        got += chunk
                    if got != msg:
                        raise ValueError(f"echo mismatch {got[:40]!r}")
                    rounds += 1
                    out["rounds"] = rounds
                    stop.wait(LONG_PERIOD)
        else:
            conn = http.client.HTTPConnection(addr[0], addr[1], timeout=timeout)
            try:
                conn.connect()
                sock = conn.sock
                while not stop.is_set():
                    l7_request(conn, f"{marker} l7 long {rounds:06d}\n".encode(), marker)
                    if conn.sock is not sock:  # reconnected behind our back: that is a loss
                        raise ConnectionError("the keep-alive connection was replaced")
                    rounds += 1
                    out["rounds"] = rounds
                    stop.wait(LONG_PERIOD)
            finally:
                conn.close()
        out.update(ok=True)
    except (OSError, ValueError, http.client.HTTPException) as e:
        out.update(ok=False, error=_error(e), lost_at=round(time.time(), 4))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--l4", required=True, help="HOST:PORT of the echo service")
    p.add_argument("--l7", required=True, help="HOST:PORT of the HTTP service (waypoint)")
    p.add_argument("--marker", required=True)
    p.add_argument("--interval-ms", type=float, default=20.0)
    p.add_argument("--long", type=int, default=2, help="long-lived connections per path")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per socket operation")
    p.add_argument("--max-seconds", type=float, default=120.0)
    args = p.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Every thread's stack on stderr, for a load that does not stop when asked.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    paths = {"l4": _addr(args.l4), "l7": _addr(args.l7)}
    attempts: dict[str, list[list[Any]]] = {k: [] for k in paths}
    longs: dict[str, list[dict[str, Any]]] = {k: [{} for _ in range(args.long)] for k in paths}
    threads = [
        threading.Thread(
            target=new_connections,
            args=(k, a, args.marker, args.interval_ms / 1000, args.timeout, stop, attempts[k]),
        )
        for k, a in paths.items()
    ]
    threads += [
        threading.Thread(target=long_lived, args=(k, a, args.marker, args.timeout, stop, o))
        for k, a in paths.items()
        for o in longs[k]
    ]
    for t in threads:
        t.start()
    # Short waits: the kernel may hand SIGTERM to any thread, and then only the main
    # thread's next bytecode runs the handler; one long wait would sleep through it.
    until = time.monotonic() + args.max_seconds
    while not stop.wait(0.1) and time.monotonic() < until:
        pass
    stop.set()
    for t in threads:
        t.join(timeout=args.timeout * 3 + 5)
    print(json.dumps({"attempts": attempts, "long": longs}))


if __name__ == "__main__":
    main()
