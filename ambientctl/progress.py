"""Progress of a long command (`up`, `down`, `apply --wait`, `demo`), as it goes.

On a terminal: one spinner line with the current step and its elapsed seconds, redrawn by a
thread every TICK seconds (so the screen is never still for a second, whatever the step
waits on), and each finished step left above it as a line. Anywhere else (a pipe, a log
file, CI): one plain line per step, nothing redrawn.

Steps go to the progress stream (stderr by default) so that stdout keeps only a command's
result; `done(text)` writes that result line to stdout. The rendering is pure
(`spinner_line`, `finished_line`); `Progress` only decides when to write.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO, cast

TICK = 0.1  # seconds between spinner frames
UNICODE_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
ASCII_FRAMES = "|/-\\"
CLEAR_LINE = "\r\x1b[K"  # carriage return, erase to the end of the line


def frames_for(encoding: str | None) -> str:
    """Braille frames when the terminal can show them, else ASCII."""
    return UNICODE_FRAMES if (encoding or "").lower().replace("-", "") == "utf8" else ASCII_FRAMES


def elapsed_text(seconds: float) -> str:
    """`0.4s`, `12s`, `2m05s`: short, and it visibly moves."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    return f"{whole // 60}m{whole % 60:02d}s"


def fit(text: str, width: int) -> str:
    """Cut to one terminal line: a wrapped spinner line cannot be redrawn in place."""
    if width <= 0 or len(text) <= width:
        return text
    return text[: max(width - 3, 0)] + "..."


def spinner_line(frames: str, tick: int, text: str, elapsed: float, width: int = 0) -> str:
    """The spinner line as written: cleared first, no newline."""
    body = f"{frames[tick % len(frames)]} {text} ({elapsed_text(elapsed)})"
    return CLEAR_LINE + fit(body, width - 1 if width else 0)


def same_step(current: str | None, new: str) -> bool:
    """Whether `new` is news of the step `current` (the same words before ": ")."""
    if current is None or ": " not in current or ": " not in new:
        return False
    return current.split(": ", 1)[0] == new.split(": ", 1)[0]


def finished_line(text: str, elapsed: float, tty: bool) -> str:
    """A step that is over: on a terminal with a check mark and its time."""
    if tty:
        return f"{CLEAR_LINE}✓ {text} ({elapsed_text(elapsed)})\n"
    return f"{text}\n"


def _width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


class Progress:
    """`step(text)` starts a step (the previous one is over); `done(text)` ends the last
    one and writes the command's result; `fail()` ends it without one (the caller reports
    the error). Usable as the `progress` callback of `localcluster.mesh` (it is callable),
    and as a context manager that always stops the spinner."""

    def __init__(
        self,
        stream: TextIO | None = None,
        out: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.out = out if out is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.frames = frames_for(getattr(self.stream, "encoding", None)) if self.tty else ""
        self._clock = clock
        self._lock = threading.Lock()
        self._text: str | None = None
        self._quiet = False  # the current text came from `status`: no finished line
        self._started = 0.0
        self._tick = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the steps ---------------------------------------------------------------------

    def step(self, text: str) -> None:
        """A new step; or, on a terminal, news of the current one when the text before
        ": " is the same ("waiting for the tunnels: 1/2 nodes" after ".. 0/2 nodes"):
        the spinner line changes, its clock keeps running."""
        with self._lock:
            if not self.tty:
                self._text = text
                self._write(f"{text}\n")
                return
            if not same_step(self._text, text):
                self._finish_current()
                self._started = self._clock()
            self._text = text
            self._quiet = False
            self._draw()
        self._ensure_thread()

    __call__ = step

    def status(self, text: str) -> None:
        """On a terminal, what the spinner says now, left no line when it is over (the
        caller prints its own); elsewhere nothing: the caller's own line says it."""
        if not self.tty:
            return
        with self._lock:
            self._finish_current()
            self._text = text
            self._quiet = True
            self._started = self._clock()
            self._draw()
        self._ensure_thread()

    def echo(self, text: str, to: TextIO | None = None) -> None:
        """A line of output (on `to`, default the progress stream) above the spinner,
        which is redrawn below it."""
        with self._lock:
            spinning = self.tty and self._text is not None
            if spinning:
                self._write(CLEAR_LINE)
            target = to if to is not None else self.stream
            target.write(f"{text}\n")
            target.flush()
            if spinning:
                self._draw()

    def done(self, text: str | None = None) -> None:
        with self._lock:
            self._finish_current()
        self._stop_thread()
        if text is not None:
            self.out.write(f"{text}\n")
            self.out.flush()

    def fail(self) -> None:
        """Stop, leaving the unfinished step visible (the error follows it)."""
        with self._lock:
            if self.tty and self._text is not None:
                self._write(f"{CLEAR_LINE}✗ {self._text} ({self._elapsed()})\n")
            self._text = None
        self._stop_thread()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is not None:
            self.fail()
        else:
            self.done()  # nothing left spinning: the last step ends as a line

    # -- output that shares the terminal with the spinner --------------------------------

    def wrap(self, stream: TextIO) -> TextIO:
        """`stream` (stdout) made to write above the spinner; a line starting with "== "
        (a section heading) also becomes the spinner's text. Unless both are terminals:
        `stream` itself."""
        if not self.tty or not stream.isatty():
            return stream
        return cast(TextIO, _Above(self, stream))

    # -- internals (called with the lock held, except the thread's loop) -----------------

    def _elapsed(self) -> str:
        return elapsed_text(self._clock() - self._started)

    def _finish_current(self) -> None:
        if self._text is not None and self.tty:
            if self._quiet:  # the caller printed it already: just clear the spinner
                self._write(CLEAR_LINE)
            else:
                self._write(finished_line(self._text, self._clock() - self._started, True))
        self._text = None
        self._quiet = False

    def _draw(self) -> None:
        if self._text is None:
            return
        line = spinner_line(
            self.frames, self._tick, self._text, self._clock() - self._started, _width(self.stream)
        )
        self._write(line)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed terminal must not turn a finished `up` into a failure

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._spin, name="progress", daemon=True)
            self._thread.start()

    def _spin(self) -> None:
        while not self._stop.wait(TICK):
            with self._lock:
                self._tick += 1
                self._draw()

    def _stop_thread(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()


class _Above(io.TextIOBase):
    """A text stream whose writes go above the spinner line (see `Progress.wrap`)."""

    def __init__(self, progress: Progress, stream: TextIO) -> None:
        super().__init__()
        self._progress = progress
        self._stream = stream
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._progress.echo(line, self._stream)
            if line.startswith("== "):
                self._progress.status(line[3:])
        return len(text)

    def flush(self) -> None:
        """A partial line stays until its newline: the spinner cannot share its row."""

    def isatty(self) -> bool:
        return self._stream.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self._stream, "encoding", "utf-8"))
