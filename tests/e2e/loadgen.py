"""Load for the restart tests, run inside a pod's netns: new connections at a fixed pace
plus a few long-lived ones, against testapp's echo port. Prints one JSON summary.

`python loadgen.py HOST PORT --seconds S --interval-ms I --long N [--connect-timeout T]`
Every loop is bounded by the duration and a hard cap on attempts. SIGTERM ends the run
early, as if the duration were up: the summary is printed all the same.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import threading
import time

MAX_ATTEMPTS = 20_000


class Deadline:
    """When the run ends: the duration's end, or now once SIGTERM arrived."""

    def __init__(self, until: float) -> None:
        self.until = until

    def stop_now(self, *_: object) -> None:
        self.until = time.monotonic()

    def running(self) -> bool:
        return time.monotonic() < self.until


def one_connection(host: str, port: int, timeout: float) -> str | None:
    """An echo round trip on a new connection; None when it worked, else what failed."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            f = s.makefile("rb")
            if not f.readline():
                return "closed before the greeting"
            s.sendall(b"ping")
            s.shutdown(socket.SHUT_WR)
            data = f.read()
            return None if data == b"ping" else f"echo was {data[:20]!r}"
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def long_lived(host: str, port: int, until: Deadline, out: dict[str, object]) -> None:
    """One connection kept for the whole run, one round trip every 100 ms."""
    rounds = 0
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            f = s.makefile("rb")
            f.readline()
            while until.running():
                msg = f"r{rounds:06d}".encode()
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    chunk = s.recv(len(msg) - len(got))
                    if not chunk:
                        raise ConnectionError("closed by peer")
                    got += chunk
                if got != msg:
                    raise ConnectionError(f"echo mismatch {got!r}")
                rounds += 1
                time.sleep(0.1)
            s.shutdown(socket.SHUT_WR)
            if f.read() != b"":
                raise ConnectionError("data after the final echo")
        out.update(ok=True, rounds=rounds)
    except OSError as e:
        out.update(ok=False, rounds=rounds, error=f"{type(e).__name__}: {e}", at=time.time())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--interval-ms", type=float, default=5.0)
    p.add_argument("--long", type=int, default=3)
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        help="seconds one attempt may take (a connection made late by SYN retransmission "
        "counts as made)",
    )
    args = p.parse_args()
    start = time.monotonic()
    until = Deadline(start + args.seconds)
    signal.signal(signal.SIGTERM, until.stop_now)
    longs: list[dict[str, object]] = [{} for _ in range(args.long)]
    threads = [
        threading.Thread(target=long_lived, args=(args.host, args.port, until, out))
        for out in longs
    ]
    for t in threads:
        t.start()
    attempts = 0
    failures: list[dict[str, object]] = []
    ok_at: list[float] = []  # when each successful attempt began
    took: list[float] = []  # how long each successful attempt took
    next_at = start
    while until.running() and attempts < MAX_ATTEMPTS:
        attempts += 1
        began = time.time()  # a failure is dated by its attempt, not by its timeout
        t0 = time.monotonic()
        error = one_connection(args.host, args.port, timeout=args.connect_timeout)
        if error is not None:
            failures.append({"at": began, "error": error})
        else:
            ok_at.append(round(began, 4))
            took.append(round(time.monotonic() - t0, 4))
        next_at += args.interval_ms / 1000
        time.sleep(max(0.0, next_at - time.monotonic()))
    last_attempt = time.time()
    for t in threads:
        t.join(timeout=args.seconds + 30)
    print(
        json.dumps(
            {
                "attempts": attempts,
                "failures": failures,
                "ok_at": ok_at,
                "connect_s": sorted(took)[-20:],
                "long": longs,
                "last": last_attempt,
            }
        )
    )


if __name__ == "__main__":
    main()
