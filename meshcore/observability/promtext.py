"""The Prometheus text exposition format, version 0.0.4, written by hand.

The tunnel exposes a handful of families; a client library's registry, collectors and
parsers cost it several megabytes of resident memory for what is a few string joins.
The output is what prometheus_client writes for the same families, byte for byte:
`# HELP` and `# TYPE` lines under the exposed name (a counter's carries `_total`), labels
sorted by name, values as Go prints floats. Rendering is pure: data in, bytes out.
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

COUNTER = "counter"
GAUGE = "gauge"


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: its exposed name (`_total` included for a counter), help text,
    type, label names and samples (label values in `labels` order, then the value)."""

    name: str
    help: str
    type: str
    labels: Sequence[str] = ()
    samples: Sequence[tuple[Sequence[str], float]] = ()


def escape_label_value(value: str) -> str:
    """A label value as the format quotes it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    """HELP text: backslash and newline escaped (a quote needs none there)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value as Go's strconv prints a float64 (what Prometheus's own clients write)."""
    d = float(value)
    if math.isnan(d):
        return "NaN"
    if math.isinf(d):
        return "+Inf" if d > 0 else "-Inf"
    s = repr(d)
    dot = s.find(".")
    # Go switches to an exponent for large values sooner than Python's repr; the cut-over
    # (more than six integer digits) is prometheus_client's, so scrapes read the same.
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def render(families: Iterable[Family]) -> bytes:
    """The exposition of `families`, in order; a family without samples still gets its
    HELP and TYPE lines (as prometheus_client writes it)."""
    out: list[str] = []
    for f in families:
        out.append(f"# HELP {f.name} {escape_help(f.help)}\n")
        out.append(f"# TYPE {f.name} {f.type}\n")
        for values, value in f.samples:
            if len(values) != len(f.labels):
                raise ValueError(
                    f"{f.name}: {len(values)} label values for {len(f.labels)} label names"
                )
            if f.labels:
                pairs = sorted(zip(f.labels, values, strict=True))
                body = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs)
                out.append(f"{f.name}{{{body}}} {format_value(value)}\n")
            else:
                out.append(f"{f.name} {format_value(value)}\n")
    return "".join(out).encode()


# -- process metrics ----------------------------------------------------------------------


class ProcessMetrics:
    """This process's `process_*` families (CPU, memory, start time, file descriptors), read
    from /proc/self at each scrape, as Prometheus client libraries export them on Linux.

    Where /proc is not there (or not readable) the families are simply absent."""

    def __init__(self, proc: str = "/proc") -> None:
        self._self = os.path.join(proc, "self")
        self._ticks = float(os.sysconf("SC_CLK_TCK"))
        self._pagesize = resource.getpagesize()
        self._btime = _boot_time(os.path.join(proc, "stat"))

    def families(self) -> list[Family]:
        out: list[Family] = []
        if self._btime is None:
            return out
        try:
            with open(os.path.join(self._self, "stat"), "rb") as f:
                # Fields after the command name, which is in parentheses and may hold spaces.
                parts = f.read().rsplit(b")", 1)[-1].split()
            vsize, rss_pages = float(parts[20]), float(parts[21])
            start_ticks = float(parts[19])
            cpu_ticks = float(parts[11]) + float(parts[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
        else:
            out += [
                _gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.", vsize),
                _gauge(
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes.",
                    rss_pages * self._pagesize,
                ),
                _gauge(
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds.",
                    start_ticks / self._ticks + self._btime,
                ),
                Family(
                    "process_cpu_seconds_total",
                    "Total user and system CPU time spent in seconds.",
                    COUNTER,
                    samples=[((), cpu_ticks / self._ticks)],
                ),
            ]
        try:
            open_fds = len(os.listdir(os.path.join(self._self, "fd")))
            max_fds = _max_open_files(os.path.join(self._self, "limits"))
        except OSError:
            return out
        out.append(_gauge("process_open_fds", "Number of open file descriptors.", open_fds))
        if max_fds is not None:
            out.append(
                _gauge("process_max_fds", "Maximum number of open file descriptors.", max_fds)
            )
        return out

    def render(self) -> bytes:
        return render(self.families())


def _gauge(name: str, help_text: str, value: float) -> Family:
    return Family(name, help_text, GAUGE, samples=[((), value)])


def _boot_time(path: str) -> float | None:
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _max_open_files(path: str) -> float | None:
    """The soft limit from /proc/self/limits ("unlimited" is reported as +Inf)."""
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(b"Max open files"):
                soft = line.split()[3]
                return math.inf if soft == b"unlimited" else float(soft)
    return None
