"""`ambientctl access-log`: the tunnels' "connection complete" lines as a table. Pure.

Each proxied connection ends with one JSON line per tunnel that carried it
(`meshcore.observability.accesslog`): the source's tunnel logs it `outbound`, the
destination's `inbound` (a plaintext client outside the mesh too). Both
are shown, each with the node whose tunnel wrote it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ambientctl import tables
from ambientctl.logfilter import Entry, parse_timestamp

EVENT = "connection complete"
HEADERS = [
    "TIME",
    "NODE",
    "DIRECTION",
    "SOURCE",
    "DESTINATION",
    "IDENTITY",
    "SENT",
    "RECV",
    "DURATION",
    "RESULT",
]
EMPTY = "No connections found.\n"
# `-f`: rows come one batch at a time, so the columns get these widths (a longer value
# widens its row only).
FOLLOW_WIDTHS = (12, 6, 17, 22, 38, 44, 6, 6, 9, 0)
GAP = "   "  # kubectl's column gap


def _fixed(rows: Sequence[Sequence[str]], widths: Sequence[int]) -> str:
    """`-f`'s rows in fixed-width columns (the table's widths cannot wait for the end)."""
    lines = [GAP.join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "".join(f"{line}\n" for line in lines)


@dataclass(frozen=True, slots=True)
class Record:
    """One access-log line and the node whose tunnel wrote it."""

    node: str
    doc: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, **self.doc}


def record_of(entry: Entry) -> Record | None:
    """An access-log record from a tunnel log line (`entry.source` is the node), or None."""
    if not entry.text.startswith("{"):
        return None
    try:
        doc = json.loads(entry.text)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("event") != EVENT:
        return None
    return Record(entry.source, doc)


def spiffe(identity: str) -> str:
    """`cluster.local/ns/a/sa/b` (a principal, as policies write it) or a full SPIFFE ID."""
    return identity if identity.startswith("spiffe://") else f"spiffe://{identity}"


def pod_matches(doc: Mapping[str, Any], pod: str) -> bool:
    """`NS/NAME` (or `NAME`, in any namespace) is the connection's source or destination."""
    ns, sep, name = pod.rpartition("/")
    for end in ("src", "dst"):
        if doc.get(f"{end}.workload") != name:
            continue
        if not sep or doc.get(f"{end}.namespace") == ns:
            return True
    return False


def matches(record: Record, pod: str | None, identity: str | None) -> bool:
    doc = record.doc
    if pod is not None and not pod_matches(doc, pod):
        return False
    if identity is not None:
        want = spiffe(identity)
        return want in (doc.get("src.identity"), doc.get("dst.identity"))
    return True


def _time(value: Any) -> str:
    when = parse_timestamp(value)
    if when is None:
        return "-"
    return datetime.fromtimestamp(when, UTC).strftime("%H:%M:%S.%f")[:-3]


def _end(doc: Mapping[str, Any], end: str) -> str:
    """A side of the connection: its workload when the tunnel knew it, else its address."""
    workload = doc.get(f"{end}.workload")
    if workload:
        return f"{doc.get(f'{end}.namespace')}/{workload}"
    return str(doc.get(f"{end}.addr") or "-")


def _destination(doc: Mapping[str, Any]) -> str:
    where = _end(doc, "dst")
    service = doc.get("dst.service")
    if service:
        short = str(service).removesuffix(".svc.cluster.local")
        where += f" (svc {short})"
    return where


def _result(doc: Mapping[str, Any]) -> str:
    """`ok`, or the error; the policy that decided, in brackets (inbound lines say it)."""
    text = str(doc.get("error") or "ok")
    policy = doc.get("authorization_policy")
    if policy:
        text += f" [policy {policy}]"
    return text


def row(record: Record) -> list[str]:
    doc = record.doc
    return [
        _time(doc.get("timestamp")),
        record.node,
        str(doc.get("direction") or "-"),
        _end(doc, "src"),
        _destination(doc),
        str(doc.get("src.identity") or "-"),
        str(doc.get("bytes_sent", "-")),
        str(doc.get("bytes_recv", "-")),
        str(doc.get("duration") or "-"),
        _result(doc),
    ]


def render_table(records: Sequence[Record]) -> str:
    """The table (kubectl style), or `No connections found.` for none."""
    return tables.render(HEADERS, [row(r) for r in records], empty=EMPTY.rstrip("\n"))


def render_follow(records: Sequence[Record], header: bool) -> str:
    """`-f`: rows in fixed-width columns (the header once, first)."""
    rows = [*([HEADERS] if header else []), *(row(r) for r in records)]
    return _fixed(rows, FOLLOW_WIDTHS) if rows else ""


def render_json(records: Iterable[Record]) -> str:
    return json.dumps([r.to_json() for r in records], indent=2) + "\n"
