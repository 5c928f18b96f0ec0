"""Tables as kubectl prints them: upper-case headers, left-aligned columns at least three
spaces apart, no borders, no trailing blanks. Pure: every table view renders through here,
so they all look alike and golden tests pin one shape."""

from __future__ import annotations

from collections.abc import Sequence

GAP = "   "  # kubectl's tabwriter pads columns with three spaces
NO_RESOURCES = "No resources found."


def render(headers: Sequence[str], rows: Sequence[Sequence[str]], empty: str = NO_RESOURCES) -> str:
    """The table, one line per row; `empty` (one line) when there are no rows."""
    if not rows:
        return empty + "\n"
    table = [[h.upper() for h in headers], *([str(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    lines = [GAP.join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return "\n".join(lines) + "\n"


def labels_text(labels: object) -> str:
    """A LABELS cell as kubectl's --show-labels writes it: k=v,k=v, or <none>."""
    if not isinstance(labels, dict) or not labels:
        return "<none>"
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
