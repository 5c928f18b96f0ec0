"""The Prometheus text format (0.0.4) read back, and filtered by metric name. Pure.

What the tunnels and waypoints expose (`meshcore.observability.promtext` writes it): `# HELP`
and `# TYPE` lines, then `name{label="value",...} value` samples. A family is its comment
lines and the samples after them (a histogram's `_bucket`, `_sum`, `_count` included).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class PromParseError(ValueError):
    """A line that is not the text format."""


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float

    def to_json(self) -> dict[str, Any]:
        # JSON has no NaN nor Infinity: those go as the format writes them.
        value: float | str = self.value
        if math.isnan(self.value):
            value = "NaN"
        elif math.isinf(self.value):
            value = "+Inf" if self.value > 0 else "-Inf"
        return {"name": self.name, "labels": self.labels, "value": value}


@dataclass(slots=True)
class Family:
    """A family's text lines as written, its name, type and parsed samples."""

    name: str
    type: str = "untyped"
    help: str = ""
    lines: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)


_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})?\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(rf'\s*({_NAME})="((?:[^"\\]|\\.)*)"\s*(,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _labels(text: str, line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if m is None:
            raise PromParseError(f"bad labels in {line!r}")
        out[m.group(1)] = re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e.group(0)], m.group(2))
        pos = m.end()
    return out


def _value(text: str, line: str) -> float:
    try:
        return float(text)  # also NaN, +Inf, -Inf, as the format writes them
    except ValueError:
        raise PromParseError(f"bad value in {line!r}") from None


def parse(text: str) -> list[Family]:
    """The families of an exposition, in order."""
    families: list[Family] = []
    current: Family | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if current is None or current.name != name:
                    current = Family(name)
                    families.append(current)
                if parts[1] == "TYPE" and len(parts) == 4:
                    current.type = parts[3].strip()
                elif parts[1] == "HELP":
                    current.help = parts[3] if len(parts) == 4 else ""
            if current is not None:
                current.lines.append(line)
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise PromParseError(f"not a sample: {line!r}")
        name = m.group(1)
        if current is None or not name.startswith(current.name):
            current = Family(name)
            families.append(current)
        current.lines.append(line)
        current.samples.append(
            Sample(name, _labels(m.group(2) or "", line), _value(m.group(3), line))
        )
    return families


def name_filter(pattern: str | None) -> re.Pattern[str] | None:
    """A metric-name filter: a regular expression searched for in the name (so a plain
    substring works as one); one that does not compile is taken literally."""
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error:
        return re.compile(re.escape(pattern))


def select(families: Sequence[Family], wanted: re.Pattern[str] | None) -> list[Family]:
    """The families whose name (or one of whose sample names) matches."""
    if wanted is None:
        return list(families)
    return [
        f
        for f in families
        if wanted.search(f.name) or any(wanted.search(s.name) for s in f.samples)
    ]


def render(families: Sequence[Family]) -> str:
    return "".join(f"{line}\n" for f in families for line in f.lines)
