"""A log-linear latency histogram in the manner of HdrHistogram, with 3 significant digits.

Values are non-negative integers (the harness records nanoseconds). Values below
SUB_BUCKETS are kept exactly; above, each power-of-two range is split into HALF equal
sub-buckets, so a bucket's width is at most 1/HALF of its lowest value: any percentile
read back is within RELATIVE_ERROR of the exact one. Counts live in a sparse dict, so a
histogram is small, mergeable (per connection, per round) and serialisable as JSON. Pure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

HALF = 1024  # sub-buckets per power of two: 2 * 10**3 <= 2 * HALF, i.e. 3 significant digits
SUB_BUCKETS = 2 * HALF
RELATIVE_ERROR = 1.0 / HALF
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def bucket_index(value: int) -> int:
    if value < 0:
        raise ValueError(f"histogram values must be >= 0, got {value}")
    if value < SUB_BUCKETS:
        return value
    shift = value.bit_length() - SUB_BUCKETS.bit_length() + 1  # value >> shift in [HALF, 2*HALF)
    return (shift + 1) * HALF + ((value >> shift) - HALF)


def bucket_range(index: int) -> tuple[int, int]:
    """The lowest and highest value that land in bucket `index`."""
    if index < SUB_BUCKETS:
        return index, index
    shift = index // HALF - 1
    low = (index % HALF + HALF) << shift
    return low, low + (1 << shift) - 1


@dataclass(slots=True)
class Histogram:
    counts: dict[int, int] = field(default_factory=dict)  # bucket index -> count
    total: int = 0
    min: int = 0
    max: int = 0

    def record(self, value: int, count: int = 1) -> None:
        i = bucket_index(value)
        self.counts[i] = self.counts.get(i, 0) + count
        if self.total == 0 or value < self.min:
            self.min = value
        self.max = max(self.max, value)
        self.total += count

    def record_all(self, values: Iterable[int]) -> None:
        for v in values:
            self.record(v)

    def merge(self, other: Histogram) -> None:
        if other.total == 0:
            return
        for i, c in other.counts.items():
            self.counts[i] = self.counts.get(i, 0) + c
        self.min = other.min if self.total == 0 else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.total += other.total

    def percentile(self, p: float) -> int:
        """Nearest-rank percentile (the smallest value with at least p% at or below it),
        read as the highest value of its bucket, clamped to the recorded range."""
        if not 0.0 <= p <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {p}")
        if self.total == 0:
            return 0
        rank = max(1, math.ceil(p / 100.0 * self.total))
        seen = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            if seen >= rank:
                return max(self.min, min(self.max, bucket_range(i)[1]))
        return self.max

    def summary(self, scale: float = 1e-6) -> dict[str, float]:
        """p50/p90/p99/p99.9/max in the caller's unit (default: ns recorded, ms out)."""
        out = {_pname(p): self.percentile(p) * scale for p in PERCENTILES}
        out["max"] = self.max * scale
        out["count"] = float(self.total)
        return out

    def cdf(self, scale: float = 1e-6) -> list[tuple[float, float]]:
        """(value, fraction of values <= it) at each non-empty bucket's highest value."""
        out: list[tuple[float, float]] = []
        seen = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            high = min(self.max, bucket_range(i)[1])
            out.append((high * scale, seen / self.total))
        return out

    def to_json(self) -> dict[str, object]:
        return {
            "counts": {str(i): c for i, c in sorted(self.counts.items())},
            "total": self.total,
            "min": self.min,
            "max": self.max,
        }

    @staticmethod
    def from_json(doc: dict[str, object]) -> Histogram:
        raw = doc.get("counts")
        if not isinstance(raw, dict):
            raise ValueError("histogram: 'counts' must be an object")
        h = Histogram()
        for k, v in raw.items():
            h.counts[int(k)] = int(v)
        h.total = _int(doc, "total")
        h.min = _int(doc, "min")
        h.max = _int(doc, "max")
        if sum(h.counts.values()) != h.total:
            raise ValueError("histogram: 'total' does not match the counts")
        return h


def _int(doc: dict[str, object], key: str) -> int:
    v = doc.get(key)
    if not isinstance(v, int):
        raise ValueError(f"histogram: {key!r} must be an integer")
    return v


def _pname(p: float) -> str:
    return "p" + (f"{p:g}".replace(".", ""))
