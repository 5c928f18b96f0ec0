"""JSON lines: the access log's own rendering is the processors' line, lines keep their order,
and a loop turn's lines reach the file by the end of the turn."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from meshcore.observability import logging as meshlog
from meshcore.observability.accesslog import ConnectionLog, Direction


@pytest.fixture
def configured() -> Iterator[None]:
    old = structlog.get_config()
    yield
    structlog.configure(**old)


def logging_to(buf: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """`buf` as stdout (set inside the test: pytest's capture sets its own between setup
    and call), and logging configured as a proxy configures it."""
    monkeypatch.setattr(sys, "stdout", buf)
    meshlog.configure("info")
    return buf


def lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_the_access_line_is_what_the_processors_write(
    configured: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = logging_to(io.StringIO(), monkeypatch)
    fields = {
        "direction": "inbound",
        "src.addr": "10.0.0.1:4000",
        "dst.identity": 'spiffe://cluster.local/ns/a"b/sa/\u00e9',
        "bytes_sent": 3,
        "bytes_recv": 0,
        "error": "connection reset\nby peer",
    }
    sink = meshlog.fast_sink(structlog.get_logger("access").bind())
    assert sink is not None
    meshlog.fast_info(sink, "connection complete", dict(fields))
    structlog.get_logger("access").info("connection complete", **fields)
    ours, theirs = lines(out)
    # Everything but the moment, key for key and in the same order.
    assert list(ours) == list(theirs)
    assert {k: v for k, v in ours.items() if k != "timestamp"} == {
        k: v for k, v in theirs.items() if k != "timestamp"
    }
    assert isinstance(ours["timestamp"], str) and isinstance(theirs["timestamp"], str)
    assert ours["timestamp"][:17] == theirs["timestamp"][:17]  # to the minute
    assert len(ours["timestamp"]) == len(theirs["timestamp"]) == len("2026-01-01T00:00:00.000000Z")


def test_no_fast_path_when_the_processors_are_not_ours(
    configured: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = logging_to(io.StringIO(), monkeypatch)
    bound = structlog.get_logger("access").bind()
    assert meshlog.fast_sink(bound) is not None
    with capture_logs() as captured:  # changes the processors list in place
        assert meshlog.fast_sink(structlog.get_logger("access").bind()) is None
        ConnectionLog(Direction.OUTBOUND, src="10.0.0.1:1").finish(1, 2)
    assert [e["event"] for e in captured] == ["connection complete"]
    assert captured[0]["src.addr"] == "10.0.0.1:1"
    meshlog.configure("warning")
    assert meshlog.fast_sink(structlog.get_logger("access").bind()) is None
    ConnectionLog(Direction.OUTBOUND).finish()
    assert out.getvalue() == ""  # info is off: nothing written either way


def test_lines_keep_their_order_and_reach_the_file_by_the_end_of_the_turn(
    configured: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushed: list[int] = []

    class Counting(io.StringIO):
        def flush(self) -> None:
            flushed.append(len(self.getvalue().splitlines()))
            super().flush()

    buf = logging_to(Counting(), monkeypatch)
    other = structlog.get_logger("ztunnel")

    async def turn() -> int:
        ConnectionLog(Direction.OUTBOUND, src="10.0.0.1:1").finish()
        other.warning("something else")
        ConnectionLog(Direction.INBOUND, src="10.0.0.1:2").finish()
        written_now = len(flushed)
        await asyncio.sleep(0)  # the turn ends: the scheduled flush runs
        await asyncio.sleep(0)
        return written_now

    assert asyncio.run(turn()) == 0  # nothing flushed line by line
    assert flushed and flushed[0] == 3  # one flush for the turn's three lines
    got = lines(buf)
    assert [(e["event"], e.get("src.addr")) for e in got] == [
        ("connection complete", "10.0.0.1:1"),
        ("something else", None),
        ("connection complete", "10.0.0.1:2"),
    ]
    # Outside a loop a line is written through at once.
    other.warning("no loop")
    assert flushed[-1] == 4


def test_a_loop_that_ends_before_its_flush_does_not_stop_later_flushes(
    configured: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    buf = logging_to(io.StringIO(), monkeypatch)
    log = structlog.get_logger("x")

    async def log_and_leave() -> None:
        log.warning("first")  # its flush is scheduled, and the loop closes first

    asyncio.run(log_and_leave())

    async def log_and_wait() -> None:
        log.warning("second")
        await asyncio.sleep(0)

    flushed: list[str] = []
    real_flush = buf.flush

    def flush() -> None:
        flushed.append(buf.getvalue())
        real_flush()

    monkeypatch.setattr(buf, "flush", flush)
    asyncio.run(log_and_wait())
    assert flushed and [json.loads(x)["event"] for x in flushed[0].splitlines()] == [
        "first",
        "second",
    ]


def test_tags_are_on_every_line_of_either_path(
    configured: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    meshlog.configure("info", tags={"worker": 1})
    try:
        fields = {"direction": "outbound", "bytes_sent": 3}
        sink = meshlog.fast_sink(structlog.get_logger("access").bind())
        assert sink is not None  # tags keep the fast path
        meshlog.fast_info(sink, "connection complete", dict(fields))
        structlog.get_logger("access").info("connection complete", **fields)
        structlog.get_logger("other").warning("something else")
        ours, theirs, other = lines(out)
        assert list(ours) == list(theirs)
        assert ours["worker"] == theirs["worker"] == other["worker"] == 1
    finally:
        meshlog.configure("info")  # untagged again for the tests after this one
