"""Shared readers for route documents: the error type, enumerations, durations, regexes and
paths, worded like the rest of the mesh (`meshcore.reader`)."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

import re2

from meshcore.reader import Reader, describe, join


class RouteConfigError(ValueError):
    """A route or traffic-policy document that cannot be used; the message names the field."""


def reader() -> Reader:
    return Reader(error=RouteConfigError)


def one_of(r: Reader, value: Any, path: str, choices: Collection[str]) -> str:
    """One of `choices`, spelled exactly (`'Regex' is not one of Exact, PathPrefix, ...`)."""
    if not isinstance(value, str):
        r.fail(path, f"expected a string, got {describe(value)}")
    if value not in choices:
        r.fail(path, f"{value!r} is not one of {', '.join(choices)}")
    return value


def integer(
    r: Reader,
    entry: Mapping[str, Any],
    key: str,
    path: str,
    default: int | None = None,
    *,
    low: int | None = None,
    high: int | None = None,
) -> int:
    """`entry[key]` as an integer within [low, high]; without a default it is required."""
    value = entry.get(key)
    at = join(path, key)
    if value is None:
        if default is None:
            r.fail(at, "is required")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        r.fail(at, f"expected an integer, got {describe(value)} {value!r}")
    if low is not None and value < low:
        r.fail(at, f"{value} is less than {low}")
    if high is not None and value > high:
        r.fail(at, f"{value} is more than {high}")
    return value


def number(
    r: Reader, entry: Mapping[str, Any], key: str, path: str, *, low: float, high: float
) -> float | None:
    """`entry[key]` as a number within [low, high], or None when not given."""
    value = entry.get(key)
    if value is None:
        return None
    at = join(path, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        r.fail(at, f"expected a number, got {describe(value)} {value!r}")
    if not low <= value <= high:
        r.fail(at, f"{value} is not in {low:g}..{high:g}")
    return float(value)


# Gateway API `Duration` (GEP-2257): 1 to 4 groups of up to 5 digits and a unit, no
# fractions, no spaces: "1h30m", "500ms", "0s".
_GATEWAY_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_GATEWAY_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
# Istio's durations (protobuf Duration as Go writes it): "1.5s", "100ms", "1m", "2h".
_ISTIO_DURATION = re.compile(r"^(?:[0-9]+(?:\.[0-9]+)?(?:h|m|s|ms|us|µs|ns))+$")
_ISTIO_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(h|ms|m|s|us|µs|ns)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def gateway_duration(r: Reader, value: Any, path: str) -> float:
    """A Gateway API duration string in seconds."""
    if not isinstance(value, str):
        r.fail(path, f"expected a duration string such as '10s', got {describe(value)}")
    if not _GATEWAY_DURATION.fullmatch(value):
        r.fail(path, f"{value!r} is not a Gateway API duration (such as '10s', '1m30s', '500ms')")
    return sum(int(n) * _UNIT[u] for n, u in _GATEWAY_PART.findall(value))


def istio_duration(r: Reader, value: Any, path: str, *, minimum: float = 0.0) -> float:
    """An Istio duration string ("1.5s", "100ms", "1m") in seconds."""
    if not isinstance(value, str):
        r.fail(path, f"expected a duration string such as '10s', got {describe(value)}")
    if not _ISTIO_DURATION.fullmatch(value):
        r.fail(path, f"{value!r} is not a duration (such as '10s', '1.5s', '100ms')")
    seconds = sum(float(n) * _UNIT[u] for n, u in _ISTIO_PART.findall(value))
    if seconds < minimum:
        r.fail(path, f"{value!r} is shorter than {minimum * 1000:g}ms")
    return seconds


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # RE2 would write every bad pattern to stderr
    return options


_RE2_OPTIONS = _options()


def regex(r: Reader, value: Any, path: str) -> Any:
    """An RE2 pattern, compiled (RE2 runs in linear time: a route's regex cannot hang us)."""
    if not isinstance(value, str):
        r.fail(path, f"expected a regular expression string, got {describe(value)}")
    if not value:
        r.fail(path, "must not be empty")
    if len(value) > 1024:
        r.fail(path, "a regular expression is at most 1024 characters")
    try:
        return re2.compile(value, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        r.fail(path, f"{value!r} is not an RE2 regular expression: {reason}")
    except (TypeError, ValueError) as exc:  # e.g. a NUL or lone surrogate in the pattern
        r.fail(path, f"{value!r} is not an RE2 regular expression: {exc}")


# What the Gateway API refuses in a path value (HTTPPathMatch validation).
_BAD_PATH_PARTS = ("//", "/./", "/../", "%2f", "%2F", "#")


def http_path(r: Reader, value: Any, path: str, *, allow_empty: bool = False) -> str:
    """An absolute request path as the Gateway API accepts it in matches and rewrites."""
    if not isinstance(value, str):
        r.fail(path, f"expected a path string, got {describe(value)}")
    if allow_empty and value == "":
        return value
    if not value.startswith("/"):
        r.fail(path, f"{value!r} must start with '/'")
    if len(value) > 1024:
        r.fail(path, "a path is at most 1024 characters")
    if any(part in value for part in _BAD_PATH_PARTS) or value.endswith(("/..", "/.")):
        r.fail(path, f"{value!r} must not contain '//', '/./', '/../', '%2f' or '#'")
    if not value.isprintable() or " " in value:
        r.fail(path, f"{value!r} must not contain spaces or control characters")
    return value


_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,256}$")


def header_name(r: Reader, value: Any, path: str) -> str:
    """An HTTP header name (RFC 7230 token), lower-cased: names compare case-insensitively."""
    if not isinstance(value, str):
        r.fail(path, f"expected a header name string, got {describe(value)}")
    if not _HEADER_NAME.fullmatch(value):
        r.fail(path, f"{value!r} is not a valid header name")
    return value.lower()


def header_value(r: Reader, entry: Mapping[str, Any], key: str, path: str) -> str:
    value = r.string(entry, key, path, empty_ok=True)
    if "\r" in value or "\n" in value or "\0" in value:
        r.fail(join(path, key), "a header value must not contain CR, LF or NUL")
    return value


_HOSTNAME = re.compile(
    r"^(\*\.)?[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$"
)


def hostname(r: Reader, value: Any, path: str, *, wildcard: bool = True) -> str:
    """A DNS name as the Gateway API takes it (lower case; `*.` only as the first label)."""
    if not isinstance(value, str):
        r.fail(path, f"expected a hostname string, got {describe(value)}")
    if len(value) > 253 or not _HOSTNAME.fullmatch(value):
        r.fail(path, f"{value!r} is not a valid hostname")
    if value.startswith("*.") and not wildcard:
        r.fail(path, f"{value!r}: a wildcard is not allowed here")
    return value
