"""The benchmark client, run inside a pod netns; prints one JSON object on stdout.

`throughput`: one connection; send whole CHUNKs until --bytes or --seconds is reached,
then wait for the server's one-byte-per-chunk acknowledgements, so the rate counts only
bytes that arrived at the server.

`latency`: open loop over one keep-alive connection. Request i is due at
start + i / rate; a sender thread sends it at (or after) that time and a receiver thread
timestamps the echoed reply. Latency is measured from the DUE time, so a stall delays
every request behind it and shows in the percentiles (no coordinated omission).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

CHUNK = 1 << 20  # must match l4_server.CHUNK
ACK_TIMEOUT = 30.0


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def throughput(host: str, port: int, total: int, seconds: float) -> dict[str, float]:
    payload = memoryview(b"\x00" * CHUNK)
    chunks_max = max(1, total // CHUNK)
    with _connect(host, port, ACK_TIMEOUT) as s:
        start = time.perf_counter()
        deadline = start + seconds
        sent = 0
        while sent < chunks_max and time.perf_counter() < deadline:
            s.sendall(payload)
            sent += 1
        acked = 0
        while acked < sent:  # bounded by the socket timeout on each recv
            data = s.recv(65536)
            if not data:
                raise ConnectionError(f"server closed after {acked} of {sent} chunks")
            acked += len(data)
        elapsed = time.perf_counter() - start
    nbytes = sent * CHUNK
    return {
        "bytes": float(nbytes),
        "seconds": elapsed,
        "gbit_per_s": nbytes * 8 / elapsed / 1e9,
    }


def _percentile(sorted_vals: list[float], q: float) -> float:
    idx = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[idx]


def latency(host: str, port: int, rate: float, seconds: float, size: int) -> dict[str, float]:
    count = max(1, int(rate * seconds))
    interval = 1.0 / rate
    msg = b"x" * size
    due = [0.0] * count
    done = [0.0] * count
    errors: list[str] = []
    # Hand the GIL over quickly: the sender waking at a due time must not wait out the
    # default 5 ms switch interval behind the receiver.
    sys.setswitchinterval(0.0001)
    with _connect(host, port, seconds + ACK_TIMEOUT) as s:
        # One warm-up round trip: connection setup (and the tunnel's HBONE handshake)
        # is not part of steady-state request latency.
        s.sendall(msg)
        _recv_exact(s, size)
        start = time.perf_counter() + 0.01

        def receiver() -> None:
            try:
                for i in range(count):
                    _recv_exact(s, size)
                    done[i] = time.perf_counter()
            except OSError as e:
                errors.append(f"receive: {e}")

        rt = threading.Thread(target=receiver, name="receiver", daemon=True)
        rt.start()
        for i in range(count):
            t = start + i * interval
            due[i] = t
            wait = t - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            s.sendall(msg)
        rt.join(seconds + ACK_TIMEOUT)
        if rt.is_alive():
            errors.append("receiver did not finish in time")
    if errors:
        raise ConnectionError("; ".join(errors))
    lat = sorted((done[i] - due[i]) * 1e3 for i in range(count))
    wall = done[-1] - start
    return {
        "requests": float(count),
        "achieved_rps": count / wall if wall > 0 else 0.0,
        "p50_ms": _percentile(lat, 0.50),
        "p90_ms": _percentile(lat, 0.90),
        "p99_ms": _percentile(lat, 0.99),
        "p999_ms": _percentile(lat, 0.999),
        "max_ms": lat[-1],
        "mean_ms": sum(lat) / len(lat),
    }


def _recv_exact(s: socket.socket, n: int) -> None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = s.recv_into(view[got:])
        if k == 0:
            raise ConnectionError(f"peer closed after {got} of {n} bytes")
        got += k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="mode", required=True)
    tp = sub.add_parser("throughput")
    tp.add_argument("--host", required=True)
    tp.add_argument("--port", type=int, required=True)
    tp.add_argument("--bytes", type=int, default=1 << 30)
    tp.add_argument("--seconds", type=float, default=10.0)
    lp = sub.add_parser("latency")
    lp.add_argument("--host", required=True)
    lp.add_argument("--port", type=int, required=True)
    lp.add_argument("--rate", type=float, default=1000.0)
    lp.add_argument("--seconds", type=float, default=5.0)
    lp.add_argument("--size", type=int, default=1024)
    args = ap.parse_args()
    if args.mode == "throughput":
        result = throughput(args.host, args.port, args.bytes, args.seconds)
    else:
        result = latency(args.host, args.port, args.rate, args.seconds, args.size)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
