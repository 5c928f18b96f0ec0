"""Where a waypoint's time per HTTP/1.1 request goes, on loopback, without root.

One process holds everything of tests/waypoint/loopback.py's mesh: an HBONE client (the
client tunnel's part), a real `Waypoint` (TLS 1.3, HTTP/2 CONNECT, router, metrics, access
log), the destination's pod proxy (HBONE in) and an app answering 1 KB per 1 KB request.
`--conns` CONNECT streams each carry keep-alive requests one after another (closed loop),
--requests in all, stopped after --seconds; the service has --endpoints pods (each its
own app; the waypoint balances over them). Printed: requests per second and CPU per
request of the whole process; with --profile, cProfile over the measured loop: the share
of time spent in waypoint/ code, the rest of the mesh code, and the top functions.

    .venv/bin/python benchmarks/waypoint_loopback.py --requests 5000 --profile

All parts share one event loop here, so figures are the process's, not the waypoint's
alone; compare runs of this script before and after a change, not with mesh_bench.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from meshcore.observability import logging as meshlog  # noqa: E402
from tests.support.aio import Loop  # noqa: E402
from tests.waypoint.loopback import start_mesh  # noqa: E402

SIZE = 1024


async def echo_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 keep-alive: a 1 KB answer per request (the body read and dropped)."""
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % SIZE + b"b" * SIZE
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            writer.write(answer)
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


REQUEST = (
    b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: %d\r\n"
    b"Content-Type: application/octet-stream\r\n\r\n" % SIZE + b"a" * SIZE
)


async def client(lw: Any, vip: str, count: int, deadline: float) -> int:
    """Requests one after another over one CONNECT stream; how many were answered 200."""
    stream = await lw.connect(f"{vip}:80")
    buf = b""
    done = 0
    try:
        while done < count and time.monotonic() < deadline:
            stream.write(REQUEST)
            while b"\r\n\r\n" not in buf:
                chunk = await asyncio.wait_for(stream.read(), 10)
                if not chunk:
                    raise ConnectionError("the waypoint ended the stream")
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(f"answer {head[:60]!r}")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(buf) < length:
                chunk = await asyncio.wait_for(stream.read(), 10)
                if not chunk:
                    raise ConnectionError("the waypoint ended the stream in a body")
                buf += chunk
            buf = buf[length:]
            done += 1
    finally:
        stream.write_eof()
    return done


def run(
    requests: int, conns: int, seconds: float, profile: bool, top: int, endpoints: int = 1
) -> dict[str, Any]:
    aio = Loop("uvloop")
    try:

        async def main() -> dict[str, Any]:
            mesh = await start_mesh(aio, {"web": [echo_app] * endpoints})
            vip = mesh.vips["web"]
            # Warm-up: connections, certificates, first-request paths.
            await asyncio.gather(
                *(client(mesh.lw, vip, 20, time.monotonic() + 10) for _ in range(conns))
            )
            # CPU time, not wall time: on a shared machine a write that wakes another
            # process often loses the CPU, and a wall-clock profile charges that to it.
            prof = cProfile.Profile(time.process_time) if profile else None
            per = max(1, requests // conns)
            cpu0, t0 = time.process_time(), time.perf_counter()
            if prof is not None:
                prof.enable()
            deadline = time.monotonic() + seconds
            got = await asyncio.gather(*(client(mesh.lw, vip, per, deadline) for _ in range(conns)))
            if prof is not None:
                prof.disable()
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            n = sum(got)
            out: dict[str, Any] = {
                "requests": n,
                "conns": conns,
                "endpoints": endpoints,
                "seconds": wall,
                "rps": n / wall if wall else 0.0,
                "cpu_us_per_request": cpu * 1e6 / n if n else None,
            }
            if prof is not None:
                out["profile"] = summarize(prof, top)
            return out

        result: dict[str, Any] = aio.run(main, limit=seconds + 60)
        return result
    finally:
        aio.close()


def summarize(prof: cProfile.Profile, top: int) -> dict[str, Any]:
    """Own time by area (waypoint/, meshcore/, ztunnel/, libraries and the rest) and the
    top functions by own time."""
    st = pstats.Stats(prof)
    raw: dict[Any, Any] = st.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values()) or 1.0
    areas: dict[str, float] = {}
    for (file, _line, _fn), v in raw.items():
        area = "other"
        for name in ("waypoint/", "meshcore/", "ztunnel/", "tests/", "site-packages/"):
            if f"/{name}" in file:
                area = name.rstrip("/")
                break
        if file == "~":
            area = "builtins"
        areas[area] = areas.get(area, 0.0) + v[2]
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return {
        "own_time_share": {k: round(v / total, 3) for k, v in sorted(areas.items())},
        "top": text.getvalue(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5000, help="requests in all (at most)")
    ap.add_argument("--conns", type=int, default=8, help="CONNECT streams, one client each")
    ap.add_argument("--seconds", type=float, default=30.0, help="stop after this long")
    ap.add_argument("--endpoints", type=int, default=1, help="pods behind the service")
    ap.add_argument("--profile", action="store_true", help="cProfile the measured loop")
    ap.add_argument("--top", type=int, default=25, help="functions listed with --profile")
    ap.add_argument(
        "--log-level",
        default="info",
        help="the waypoint's LOG_LEVEL (info writes one access-log line per request)",
    )
    a = ap.parse_args()
    if not 1 <= a.requests <= 1_000_000 or not 1 <= a.conns <= 256 or not 0 < a.seconds <= 600:
        ap.error("--requests 1..1000000, --conns 1..256, --seconds up to 600")
    if not 1 <= a.endpoints <= 200:
        ap.error("--endpoints 1..200")
    # Logging as `python -m waypoint` sets it up (JSON lines, one per request), written to
    # /dev/null here: the waypoint's cost of rendering them stays, the terminal's goes. The
    # access log writes to the stdout of its time, so the run is inside the redirect too.
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        meshlog.configure(a.log_level)
        out = run(a.requests, a.conns, a.seconds, a.profile, a.top, a.endpoints)
    prof = out.pop("profile", None)
    if prof is not None:
        print(prof["top"])
        print("own time by area:", json.dumps(prof["own_time_share"]))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
