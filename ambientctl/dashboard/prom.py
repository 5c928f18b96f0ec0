"""The Prometheus text format, read: every sample of a scrape as (name, labels, value).

Pure and tolerant: a line that is not a sample (comments, HELP/TYPE, garbage) is skipped,
so one odd line from a proxy never hides the rest of its metrics.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def _unescape(value: str) -> str:
    return re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group(0)], value)


def parse(text: str, names: Iterable[str] | None = None) -> list[Sample]:
    """The samples of `text` (only those of `names` when given)."""
    wanted = frozenset(names) if names is not None else None
    out: list[Sample] = []
    for raw in text.splitlines():
        m = _SAMPLE.match(raw)
        if m is None or (wanted is not None and m.group("name") not in wanted):
            continue
        try:
            value = float(m.group("value"))
        except ValueError:
            continue
        labels = {k: _unescape(v) for k, v in _LABEL.findall(m.group("labels") or "")}
        out.append(Sample(m.group("name"), labels, value))
    return out
