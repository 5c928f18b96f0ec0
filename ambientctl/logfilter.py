"""What `ambientctl logs` shows of the log files it reads: pure decisions, no I/O.

The mesh's processes write JSON lines with an ISO `timestamp` (structlog); an app writes
whatever it writes. A line without a timestamp takes the one of the line before it in the
same file (a traceback belongs to the event it follows); lines before the first timestamp
are dated by the file's modification time at the latest, so `--since` never drops a line
that could be recent nor keeps a file that has been silent for longer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ambientctl.errors import UsageError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class LogUsage(UsageError):
    """A flag value that cannot mean anything (exit 2)."""


def parse_duration(text: str) -> float:
    """`--since`: Go's duration syntax as kubectl takes it (`30s`, `5m`, `1h30m`, `2d`),
    in seconds. A bare number is refused: its unit would be a guess."""
    text = text.strip()
    pos = 0
    total = 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise LogUsage(f"duration {text!r}: expected e.g. 30s, 5m, 1h30m, 2d")
    return total


def timestamp_of(line: str) -> float | None:
    """The epoch seconds of a JSON log line's `timestamp`, or None (not JSON, none, bad)."""
    if not line.startswith("{"):
        return None
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    return parse_timestamp(doc.get("timestamp"))


def parse_timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None  # the mesh writes UTC with an offset; a naive time is not ours to guess
    return when.timestamp()


@dataclass(frozen=True, slots=True)
class Entry:
    """One log line, where it came from, and when (epoch seconds; see the module doc)."""

    source: str
    text: str
    when: float


def entries(source: str, lines: Iterable[str], mtime: float) -> list[Entry]:
    """A file's lines as entries, each dated (see the module doc)."""
    out: list[Entry] = []
    last: float | None = None
    undated: list[str] = []
    for line in lines:
        ts = timestamp_of(line)
        if ts is None and last is None:
            undated.append(line)
            continue
        if ts is not None:
            if undated:
                # Lines before the first timestamp: no later than it (nor the file's mtime).
                out.extend(Entry(source, u, min(ts, mtime)) for u in undated)
                undated = []
            last = ts
        assert last is not None
        out.append(Entry(source, line, last))
    out.extend(Entry(source, u, mtime) for u in undated)
    return out


def select(
    per_source: Sequence[Sequence[Entry]], since: float | None, tail: int | None
) -> list[Entry]:
    """Every source's entries, merged in time order (a file's own order kept), those at or
    after `since` (epoch seconds), the last `tail` of them."""
    merged = sorted(
        (e for entries_ in per_source for e in entries_),
        key=lambda e: e.when,
    )  # sorted() is stable: within a file (and at equal times) the order is kept
    if since is not None:
        merged = [e for e in merged if e.when >= since]
    if tail is not None:
        merged = merged[-tail:] if tail > 0 else []
    return merged


def render(entry: Entry, prefix: bool) -> str:
    """A line as printed: as written, with `[source] ` in front when several are shown
    (as `kubectl logs --prefix`)."""
    return f"[{entry.source}] {entry.text}" if prefix else entry.text


def complete_lines(buffer: str) -> tuple[list[str], str]:
    """The whole lines of what a follower read so far, and the unfinished rest."""
    *lines, rest = buffer.split("\n")
    return lines, rest
