"""Labels as Kubernetes writes them, and the one label value the mesh itself reads. Pure.

Key: an optional prefix (a DNS subdomain, at most 253 characters) and `/`, then a name of
at most 63 characters of `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`. Value: empty, or at
most 63 characters of the same form. `istio.io/dataplane-mode` takes `ambient` or `none`
only (case-sensitive, as Istio reads it): any other value would silently enrol nothing.
`istio.io/use-waypoint` and `istio.io/use-waypoint-namespace` take a DNS label (a Gateway's
or a namespace's name; `none` opts out of a namespace's waypoint).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from redirect.enrolment import DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE

DATAPLANE_MODES = (DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_NONE)
MAX_NAME = 63
MAX_PREFIX = 253
MAX_VALUE = 63
_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_DNS_LABEL_VALUE = re.compile(_DNS_LABEL)
# The waypoint bindings: each value names a Gateway (or `none`) or a namespace.
WAYPOINT_LABELS = {
    "istio.io/use-waypoint": "waypoint Gateway (or none)",
    "istio.io/use-waypoint-namespace": "namespace",
}
_NAME_RULE = "alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"


class LabelError(ValueError):
    """A label key, value or change is not valid; the message says which and why."""


@dataclass(frozen=True, slots=True)
class LabelChange:
    """`key=value` sets the label; `key-` (value None) removes it, as in `kubectl label`."""

    key: str
    value: str | None


def key_error(key: str) -> str | None:
    """Why `key` is not a Kubernetes label key, or None."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix:
            return f"label key {key!r}: the prefix before '/' must not be empty"
        if len(prefix) > MAX_PREFIX or not _DNS_SUBDOMAIN.fullmatch(prefix):
            return (
                f"label key {key!r}: prefix {_short(prefix)} must be a DNS subdomain (lowercase "
                f"alphanumerics, '-' and '.', at most {MAX_PREFIX} characters)"
            )
    if not name:
        return f"label key {key!r}: the name must not be empty"
    if len(name) > MAX_NAME:
        return f"label key {_short(key)}: the name is longer than {MAX_NAME} characters"
    if not _NAME.fullmatch(name):
        return f"label key {key!r}: the name must be {_NAME_RULE}"
    return None


def value_error(key: str, value: str) -> str | None:
    """Why `value` is not a valid value for label `key`, or None."""
    if len(value) > MAX_VALUE:
        return f"label {key}: value {_short(value)} is longer than {MAX_VALUE} characters"
    if value and not _NAME.fullmatch(value):
        return f"label {key}: value {value!r} must be empty or {_NAME_RULE}"
    if key in WAYPOINT_LABELS and not _DNS_LABEL_VALUE.fullmatch(value):
        return (
            f"label {key}: value {value!r} must name a {WAYPOINT_LABELS[key]} "
            "(a DNS label: lowercase alphanumerics and '-')"
        )
    if key == DATAPLANE_MODE_LABEL and value not in DATAPLANE_MODES:
        return (
            f"label {key}: value {value!r} must be one of {', '.join(DATAPLANE_MODES)} "
            "(lowercase, as Istio reads it)"
        )
    return None


def label_errors(labels: Mapping[str, str]) -> list[str]:
    """Every problem with a set of labels (keys, then values)."""
    out = []
    for key, value in labels.items():
        problem = key_error(key) or value_error(key, value)
        if problem is not None:
            out.append(problem)
    return out


def parse_change(text: str) -> LabelChange:
    """`KEY=VALUE` or `KEY-`, fully checked. Raises LabelError."""
    if "=" in text:
        key, _, value = text.partition("=")
        problem = key_error(key) or value_error(key, value)
        if problem is not None:
            raise LabelError(problem)
        return LabelChange(key, value)
    if text.endswith("-") and len(text) > 1:
        key = text[:-1]
        problem = key_error(key)
        if problem is not None:
            raise LabelError(problem)
        return LabelChange(key, None)
    raise LabelError(f"label {_short(text)}: expected KEY=VALUE to set or KEY- to remove")


def parse_changes(texts: list[str]) -> list[LabelChange]:
    """All of them or none: every entry is checked before any is used. Raises LabelError
    naming every bad entry."""
    changes: list[LabelChange] = []
    problems: list[str] = []
    seen: set[str] = set()
    for text in texts:
        try:
            change = parse_change(text)
        except LabelError as e:
            problems.append(str(e))
            continue
        if change.key in seen:
            problems.append(f"label {change.key}: given more than once")
        seen.add(change.key)
        changes.append(change)
    if problems:
        raise LabelError("; ".join(problems))
    return changes


def _short(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit] + "...")
