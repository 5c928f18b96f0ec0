"""The chaos benchmark's table: one row per target, from the events' records (the dicts
`results.json` holds). Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .verdict import EXPECTED, NOT_MADE, PATHS, Attempt, outage, summary


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _count(events: Sequence[Mapping[str, Any]], key: str) -> str:
    lines = [line for e in events for line in e["findings"][key]]
    return "none" if not lines else f"{len(lines)} ({lines[0]})"


def event_recovery(event: Mapping[str, Any]) -> float | None:
    """The event's recovery time: the slowest path's (None if a path never recovered)."""
    values = [event["paths"][p]["recovery_s"] for p in PATHS]
    return None if any(v is None for v in values) else max(values)


def rows(events: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    by_target: dict[str, list[Mapping[str, Any]]] = {}
    for e in events:
        by_target.setdefault(e["target"], []).append(e)
    out = []
    for target, evs in by_target.items():
        kind = evs[0]["kind"]
        attempted = sum(e["paths"][p]["attempted"] for e in evs for p in PATHS)
        failed = sum(e["paths"][p]["failed"] for e in evs for p in PATHS)
        rec = [event_recovery(e) for e in evs]
        med, worst = summary([r for r in rec if r is not None])
        never = sum(1 for r in rec if r is None)
        ready_med, _ = summary([e["ready_s"] for e in evs])
        lost = {p: sum(e["paths"][p]["long_lost"] for e in evs) for p in PATHS}
        total = {p: sum(e["paths"][p]["long_total"] for e in evs) for p in PATHS}
        may = EXPECTED[kind].lose
        lost_text = ", ".join(f"{p} {lost[p]}/{total[p]}" for p in PATHS)
        lost_text += " (expected: " + (" and ".join(sorted(may)) + " lost)" if may else "none)")
        out.append(
            {
                "target": target,
                "iterations": str(len(evs)),
                "failed / attempted": f"{failed} / {attempted}",
                "recovery median / max (s)": f"{_fmt(med)} / {_fmt(worst)}"
                + (f" ({never} never)" if never else ""),
                "ready (s)": _fmt(ready_med),
                "long-lived lost": lost_text,
                "plaintext": _count(evs, "plaintext"),
                "bypass": _count(evs, "bypass"),
                "stale": _count(evs, "stale"),
                "unexpected": _count(evs, "unexpected"),
            }
        )
    return out


def markdown(table: Sequence[Mapping[str, str]]) -> str:
    if not table:
        return "(no events)\n"
    heads = list(table[0])
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in table:
        lines.append("| " + " | ".join(r[h].replace("|", "/") for h in heads) + " |")
    return "\n".join(lines) + "\n"


def rejudge(event: dict[str, Any]) -> dict[str, Any]:
    """The event's outage figures computed again from its kept timeline (after a change to
    how attempts are counted); everything else is as recorded."""
    killed = event["times"]["killed_at"]
    for p in PATHS:
        path = event["paths"][p]
        o = outage([Attempt.from_row(r) for r in path["timeline"]], killed)
        path.update(attempted=o.attempted, failed=o.failed, recovery_s=o.recovery_s)
        path["not_made"] = sum(1 for r in path["timeline"] if str(r[3] or "").startswith(NOT_MADE))
    return event
