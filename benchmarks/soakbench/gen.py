"""The soak load generator, run as `python -m soakbench.gen ...` inside the client pod's
netns (the harness enters it and reads its JSON lines on stdout). One uvloop process.

1. Held: opens --held connections (--parallel at a time, each checked end to end by one
   request and answer) and keeps them. Every --held-period seconds each one makes a small
   round trip, spread evenly over the period, so a connection the mesh dropped is noticed
   (EOF, reset, or no answer within TIMEOUT). Dead ones are counted, not reopened.
   Prints {"phase": "held", ...}.
2. Churn, for --duration seconds: new connection k is due at start + k / --rate; each
   connects, sends one request with `Connection: close`, reads the answer and waits for
   the server's close. Open loop: a due start is launched when it is due, whatever the
   earlier ones are doing, unless --max-in-flight are still open (counted `missed_cap`) or
   the generator itself is more than MAX_LAG late (counted `missed_late`): a missed
   schedule is counted, never made up for by a burst or hidden. Latency is from the
   actual connect to the answer; how late each start was is reported apart (`lag`), so a
   busy generator is not read as a slow mesh.
   Every --interval seconds prints {"phase": "interval", ...}: counts, errors by kind,
   latency histograms (ns) of the new connections and of the held round trips, held alive.
3. Prints {"phase": "end", ...}, then holds the held connections until a line (or EOF)
   arrives on stdin (at most HOLD_AT_END s), closes them, prints {"phase": "closed"}.

Every loop is bounded in count and in time; the process ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import socket
import sys
import time
from typing import Any, cast

import uvloop
from meshbench.hist import Histogram

from .wire import HELD_OPEN_REQUEST, HELD_REQUEST, NEW_REQUEST, AnswerParser, error_kind

TIMEOUT = 10.0  # seconds a connect, an answer or the server's close may take
MAX_LAG = 1.0  # a start more than this late is missed, not launched in a burst
TICK = 0.05  # seconds between the held round-trip scheduler's turns
HOLD_AT_END = 120.0  # seconds the held connections wait for the harness's go at the end
NS = 1_000_000_000


def _now_ns() -> int:
    return time.monotonic_ns()


class Counters:
    """One interval's figures; `take` returns them and starts the next interval."""

    __slots__ = (
        "held_errors", "held_hist", "held_ok", "held_sent", "lag_hist", "loop_lag_max_ns",
        "missed_cap", "missed_late", "new_errors", "new_hist", "new_ok", "new_started",
    )  # fmt: skip

    def __init__(self) -> None:
        self.new_started = 0
        self.new_ok = 0
        self.new_errors: dict[str, int] = {}
        self.missed_cap = 0
        self.missed_late = 0
        self.new_hist = Histogram()
        self.lag_hist = Histogram()
        self.held_sent = 0
        self.held_ok = 0
        self.held_errors: dict[str, int] = {}
        self.held_hist = Histogram()
        self.loop_lag_max_ns = 0

    def take(self) -> dict[str, Any]:
        out = {
            "new": {
                "started": self.new_started, "ok": self.new_ok, "errors": self.new_errors,
                "missed_cap": self.missed_cap, "missed_late": self.missed_late,
                "hist_ns": self.new_hist.to_json(), "lag_hist_ns": self.lag_hist.to_json(),
            },
            "held": {
                "sent": self.held_sent, "ok": self.held_ok, "errors": self.held_errors,
                "hist_ns": self.held_hist.to_json(),
            },
            "loop_lag_max_ms": self.loop_lag_max_ns / 1e6,
        }  # fmt: skip
        self.__init__()  # type: ignore[misc]
        return out


def _count(errors: dict[str, int], kind: str) -> None:
    errors[kind] = errors.get(kind, 0) + 1


class HeldConn(asyncio.Protocol):
    """One held connection. `sent_ns` is the send time of the round trip in flight (0:
    none); `ready` is resolved by the first answer while the connection is being opened."""

    __slots__ = ("gen", "parser", "ready", "sent_ns", "slot", "transport")

    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.parser = AnswerParser()
        self.transport: asyncio.Transport | None = None
        self.sent_ns = 0
        self.slot = -1  # index in gen.held once kept
        self.ready: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            n = self.parser.feed(data)
        except ValueError as e:
            self.gen.held_failed(self, error_kind(e, "held"))
            return
        if not n:
            return
        if self.ready is not None:
            if not self.ready.done():
                self.ready.set_result(None)
            self.ready = None
            self.sent_ns = 0
            return
        if self.sent_ns:
            c = self.gen.counters
            c.held_ok += 1
            c.held_hist.record(_now_ns() - self.sent_ns)
            self.sent_ns = 0

    def eof_received(self) -> bool:
        self.gen.held_failed(self, "held:closed_by_peer")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("closed while opening"))
        self.gen.held_failed(self, error_kind(exc, "held") if exc else "held:closed_by_peer")


class NewConn(asyncio.Protocol):
    """One churn connection: request on connect, `answered` resolved by the full answer,
    `closed` by the end of the connection (the server's close, or an error)."""

    __slots__ = ("answered", "closed", "error", "parser", "transport")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.parser = AnswerParser()
        self.answered: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.error: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(NEW_REQUEST)

    def data_received(self, data: bytes) -> None:
        try:
            if self.parser.feed(data) and not self.answered.done():
                self.answered.set_result(None)
        except ValueError as e:
            self._fail(e)

    def eof_received(self) -> bool:
        if not self.answered.done():
            self._fail(ConnectionError("closed before the answer"))
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._fail(exc)
        if not self.answered.done():
            self.answered.set_exception(ConnectionResetError("closed before the answer"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if not self.answered.done():
            self.answered.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


class Generator:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.loop = asyncio.get_running_loop()
        self.counters = Counters()
        self.held: list[HeldConn | None] = []
        self.alive = 0
        self.in_flight = 0
        self.closing = False
        self.total_new_ok = 0
        self.total_missed = 0

    def emit(self, doc: dict[str, Any]) -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        doc["cpu_s"] = ru.ru_utime + ru.ru_stime
        sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    # --- held -----------------------------------------------------------------------------

    def held_failed(self, conn: HeldConn, kind: str) -> None:
        if conn.slot < 0 or self.held[conn.slot] is not conn:
            return  # still opening (counted there) or already counted
        self.held[conn.slot] = None
        self.alive -= 1
        if not self.closing:
            _count(self.counters.held_errors, kind)
        if conn.transport is not None:
            conn.transport.abort()

    async def open_held(self) -> dict[str, Any]:
        a = self.a
        gate = asyncio.Semaphore(a.parallel)
        errors: dict[str, int] = {}
        t0 = time.monotonic()

        async def one() -> None:
            async with gate:
                conn = HeldConn(self)
                conn.ready = self.loop.create_future()
                phase = "connect"
                try:
                    async with asyncio.timeout(TIMEOUT):
                        await self.loop.create_connection(lambda: conn, a.host, a.port)
                        phase = "answer"
                        assert conn.transport is not None
                        conn.transport.write(HELD_OPEN_REQUEST)
                        await conn.ready
                except (OSError, ValueError, TimeoutError, ConnectionError) as e:
                    _count(errors, error_kind(e, phase))
                    if conn.transport is not None:
                        conn.transport.abort()
                    return
                conn.slot = len(self.held)
                self.held.append(conn)
                self.alive += 1

        bound = 30.0 + a.held / 100.0
        tasks = [asyncio.ensure_future(one()) for _ in range(a.held)]
        _, pending = await asyncio.wait(tasks, timeout=bound)
        for t in pending:
            t.cancel()
        if pending:
            errors["open:not_in_time"] = len(pending)
        return {
            "phase": "held", "requested": a.held, "opened": self.alive, "errors": errors,
            "seconds": time.monotonic() - t0,
        }  # fmt: skip

    async def held_round_trips(self, until: float) -> None:
        """Each held connection once per --held-period, spread evenly; bounded by `until`."""
        n = len(self.held)
        if n == 0:
            return
        per_tick = n * TICK / self.a.held_period
        pos = 0.0
        timeout_ns = int(TIMEOUT * NS)
        next_t = time.monotonic()
        c = self.counters
        while (now := time.monotonic()) < until:
            c = self.counters
            lag = int((now - next_t) * NS)
            if lag > c.loop_lag_max_ns:
                c.loop_lag_max_ns = lag
            start, pos = int(pos), pos + per_tick
            now_ns = _now_ns()
            for k in range(start, int(pos)):
                conn = self.held[k % n]
                if conn is None:
                    continue
                if conn.sent_ns:
                    if now_ns - conn.sent_ns > timeout_ns:
                        self.held_failed(conn, "held:no_answer")
                    continue
                assert conn.transport is not None
                conn.sent_ns = now_ns
                conn.transport.write(HELD_REQUEST)
                c.held_sent += 1
            next_t += TICK
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    # --- churn ----------------------------------------------------------------------------

    async def new_connection(self, due: float) -> None:
        c = self.counters
        t0 = time.monotonic()
        c.new_started += 1
        c.lag_hist.record(max(0, int((t0 - due) * NS)))
        self.in_flight += 1
        conn = NewConn(self.loop)
        phase = "connect"
        try:
            async with asyncio.timeout(TIMEOUT):
                await self.loop.create_connection(lambda: conn, self.a.host, self.a.port)
                phase = "answer"
                await conn.answered
                c = self.counters  # the interval may have turned meanwhile
                c.new_hist.record(int((time.monotonic() - t0) * NS))
                phase = "close"
                await conn.closed
            if conn.error is not None:
                raise conn.error
            c = self.counters
            c.new_ok += 1
            self.total_new_ok += 1
        except (OSError, ValueError, TimeoutError, ConnectionError) as e:
            _count(self.counters.new_errors, error_kind(e, phase))
            if conn.transport is not None:
                conn.transport.abort()
        finally:
            self.in_flight -= 1

    async def churn(self, start: float, until: float) -> None:
        a = self.a
        interval = 1.0 / a.rate if a.rate > 0 else 0.0
        k = 0
        tasks: set[asyncio.Task[None]] = set()
        if a.rate <= 0:  # held connections only
            await asyncio.sleep(max(0.0, until - time.monotonic()))
        while a.rate > 0:
            now = time.monotonic()
            if now >= until:
                break
            due_count = min(int((now - start) * a.rate) + 1, int((until - start) * a.rate))
            c = self.counters
            while k < due_count:
                due = start + k * interval
                k += 1
                if now - due > MAX_LAG:
                    c.missed_late += 1
                    self.total_missed += 1
                elif self.in_flight >= a.max_in_flight:
                    c.missed_cap += 1
                    self.total_missed += 1
                else:
                    t = asyncio.ensure_future(self.new_connection(due))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
            next_due = start + k * interval
            await asyncio.sleep(min(max(0.0005, next_due - time.monotonic()), 0.05))
        # Let those in flight finish (each bounded by TIMEOUT twice over: answer, close).
        if tasks:
            await asyncio.wait(tasks, timeout=2 * TIMEOUT + 1.0)

    async def report(self, start: float, until: float) -> None:
        """Every interval's line on time, but the last: that one is emitted once the
        churn's last connections have finished, so it holds them."""
        k = 1
        while (at := start + k * self.a.interval) < until - 1e-6:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            self.emit_interval(time.monotonic() - start)
            k += 1

    def emit_interval(self, t: float) -> None:
        doc = {"phase": "interval", "t": t, "alive": self.alive, "in_flight": self.in_flight}
        doc.update(self.counters.take())
        self.emit(doc)

    async def run(self) -> None:
        a = self.a
        self.emit(await self.open_held())
        start = time.monotonic()
        until = start + a.duration
        # The held round trips go on while the last churn connections finish.
        held = asyncio.ensure_future(self.held_round_trips(until + 2 * TIMEOUT + 2.0))
        reporter = asyncio.ensure_future(self.report(start, until))
        await self.churn(start, until)
        await reporter
        held.cancel()
        self.emit_interval(time.monotonic() - start)  # the last, with the ones in flight
        self.emit(
            {
                "phase": "end", "alive": self.alive, "held_opened": len(self.held),
                "seconds": time.monotonic() - start, "new_ok": self.total_new_ok,
                "missed": self.total_missed,
            }
        )  # fmt: skip
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.loop.run_in_executor(None, sys.stdin.readline), HOLD_AT_END)
        self.closing = True
        for conn in self.held:
            if conn is not None and conn.transport is not None:
                conn.transport.close()
        await asyncio.sleep(1.0)
        self.emit({"phase": "closed"})


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--held", type=int, default=10_000)
    ap.add_argument("--held-period", type=float, default=30.0)
    ap.add_argument("--parallel", type=int, default=256)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--max-in-flight", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--interval", type=float, default=5.0)
    a = ap.parse_args(argv)
    if not 0 <= a.held <= 50_000 or not 0 <= a.rate <= 5_000 or a.max_in_flight < 1:
        ap.error("--held 0..50000, --rate 0..5000, --max-in-flight >= 1")
    if not 0 < a.duration <= 7200 or not 0.2 <= a.interval <= 60 or a.held_period < TIMEOUT:
        ap.error(f"--duration 0..7200 s, --interval 0.2..60 s, --held-period >= {TIMEOUT:g} s")
    return a


async def _main(a: argparse.Namespace) -> None:
    await Generator(a).run()


def main() -> None:
    a = parse_args()
    soft, _ = raise_nofile()
    need = a.held + a.max_in_flight + 64
    if soft < need:
        # Said, not worked around: the harness reports the connections that fail to open.
        print(f"soakbench.gen: open-file limit {soft} < {need} needed", file=sys.stderr)
    socket.setdefaulttimeout(TIMEOUT)
    uvloop.run(_main(a))


if __name__ == "__main__":
    main()
