"""structlog configured for JSON lines on stdout, one object per event.

Lines are written in the order they are logged, into the file's buffer, and the buffer goes
to the file once per turn of the event loop (at once outside a loop): a tunnel logs one
access-log line per connection in each direction, and a write system call per line cost as
much as the rest of the line. What a SIGKILL can lose is the current turn's lines.

`fast_info` is the access log's way around the processors: the same JSON object, rendered
here, when structlog is configured as `configure` left it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


class LineLogger:
    """structlog's logger: each message a line into `file`'s buffer; one flush per loop turn.
    Every logger of one file shares one `_FileState`: its lock, and the loop whose turn end
    will flush."""

    __slots__ = ("_file", "_shared")

    def __init__(self, file: TextIO, shared: _FileState) -> None:
        self._file = file
        self._shared = shared

    def msg(self, message: str) -> None:
        s = self._shared
        with s.lock:
            self._file.write(message + "\n")
            loop = asyncio._get_running_loop()
            if loop is None:  # no loop in this thread: write through
                self._file.flush()
                return
            if s.pending is loop:  # this turn's flush is already scheduled
                return
            # (A flush scheduled on a loop that ended before running it is replaced here.)
            s.pending = loop
        loop.call_soon(s.flush, self._file, loop)

    log = debug = info = warn = warning = err = error = critical = exception = msg
    failure = fatal = msg


class _FileState:
    __slots__ = ("lock", "pending")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: asyncio.AbstractEventLoop | None = None  # whose turn end will flush

    def flush(self, file: TextIO, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:
            if self.pending is loop:
                self.pending = None
            # A closed or vanished stdout: nowhere to say it.
            with contextlib.suppress(OSError, ValueError):
                file.flush()


class LineLoggerFactory:
    """Each logger writes to sys.stdout as it is when the logger is made, so a stdout
    replaced later (a test's capture, a redirected child) is followed."""

    def __init__(self) -> None:
        self._states: dict[int, tuple[TextIO, _FileState]] = {}

    def __call__(self, *args: Any) -> LineLogger:
        file = sys.stdout
        known = self._states.get(id(file))
        if known is None or known[0] is not file:
            known = (file, _FileState())
            self._states = {id(file): known}  # the newest stdout only: no stale references
        return LineLogger(file, known[1])


class _Configured:
    """What `configure` installed, so `fast_info` knows the processors are its own."""

    processors: list[Any] | None = None
    # Its items as installed: `capture_logs` changes the list in place.
    items: tuple[Any, ...] = ()
    info: bool = False
    # Fields every line carries (`configure`'s `tags`): which process of several wrote it.
    tags: dict[str, Any] = {}


def configure(level: str = "info", tags: Mapping[str, Any] | None = None) -> None:
    """`tags`: fields added to every line (a tunnel's worker process: `{"worker": 1}`),
    on both paths (the processors and `fast_info`)."""
    fixed = dict(tags or {})
    processors: list[Any] = [
        *([_tagger(fixed)] if fixed else []),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(),
    ]
    threshold = _LEVELS.get(level, logging.ERROR)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=LineLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    _Configured.processors = processors
    _Configured.items = tuple(processors)
    _Configured.info = threshold <= logging.INFO
    _Configured.tags = fixed


def _tagger(tags: dict[str, Any]) -> Any:
    def add_tags(_logger: object, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        for key, value in tags.items():
            event.setdefault(key, value)
        return event

    return add_tags


def fast_sink(bound: Any, processors: list[Any] | None = None) -> LineLogger | None:
    """The logger under a bound logger when `fast_info` may render for it: structlog
    configured by `configure` with info enabled, processors unchanged (a test's
    `capture_logs` swaps them), and the logger one of ours. Else None: go through structlog.
    `processors`: the configured list, when the caller has just read the configuration."""
    if not _Configured.info:
        return None
    if processors is None:
        processors = structlog.get_config()["processors"]
    if processors is not _Configured.processors or tuple(processors or ()) != _Configured.items:
        return None
    logger = getattr(bound, "_logger", None)
    return logger if type(logger) is LineLogger else None


class BoundOnce:
    """A logger for one line per connection or request (an access log), bound once and
    bound again only when what binding reads has changed: the configuration (processors,
    wrapper with its level, context class, logger factory) or sys.stdout (the logger writes
    to the stdout of when it was made, and a test's capture or a redirected child replaces
    it). Binding on every line, as the lazy proxy does, cost about a fifth of writing the
    line, once per connection in each tunnel. A test's `capture_logs` changes the
    processors list in place, which bound loggers follow."""

    __slots__ = ("key", "lazy", "logger", "processors")

    def __init__(self, lazy: Any) -> None:
        self.lazy = lazy  # structlog.get_logger(...)
        self.key: tuple[object, ...] = ()
        self.logger: Any = None
        self.processors: Any = None  # as read by the last `get`, for `fast_sink`

    def get(self) -> Any:
        cfg = structlog.get_config()
        self.processors = cfg["processors"]
        key = (
            sys.stdout,
            cfg["processors"],
            cfg["wrapper_class"],
            cfg["context_class"],
            cfg["logger_factory"],
        )
        # Tuples compare item by item, the same object first: equal means unchanged (an
        # equal processors list behaves alike).
        if key != self.key:
            self.key = key
            self.logger = self.lazy.bind()
        return self.logger

    def info(self, event: str, fields: dict[str, Any]) -> None:
        """`log.info(event, **fields)`: rendered here (`fast_info`) when structlog is as
        `configure` left it, else through the processors. `fields`: JSON-safe values."""
        bound = self.get()
        # The configuration `get` just read, not read a second time per line.
        sink = fast_sink(bound, self.processors)
        if sink is not None:  # the same line, without the processors' calls
            fast_info(sink, event, fields)
        else:
            bound.info(event, **fields)


class _Clock:
    """The ISO timestamp of now, as structlog's `TimeStamper(fmt="iso", utc=True)` writes
    it; the part up to the second is made once per second."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def now(self) -> str:
        t = time.time()
        second = int(t)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.prefix}.{int((t - second) * 1_000_000):06d}Z"


_clock = _Clock()
_dumps = json.JSONEncoder().encode


def render_info(event: str, fields: dict[str, Any]) -> str:
    """The line the configured processors make of `log.info(event, **fields)` (JSON-safe
    values only: str, int, float, None)."""
    fields["event"] = event
    for key, value in _Configured.tags.items():  # where the processors put them
        fields.setdefault(key, value)
    fields["timestamp"] = _clock.now()
    fields["level"] = "info"
    return _dumps(fields)


def fast_info(sink: LineLogger, event: str, fields: dict[str, Any]) -> None:
    """`log.info(event, **fields)` for a logger whose `fast_sink` is `sink`."""
    sink.msg(render_info(event, fields))
