"""Reading a proxy's settings from its environment: the typed readers both proxies share.

Each proxy writes its variable names and defaults once, in its own `config` module, and
parses them with these pure functions of a mapping; an error names the variable.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

from meshcore.hbone.limits import DEFAULT_LIMITS, HboneLimits

T = TypeVar("T")

HBONE_PREFIX = "HBONE_"
LOG_LEVELS = ("debug", "info", "warning", "error")

# Go's time.ParseDuration units in nanoseconds (Istio's settings are Go durations); the
# micro sign comes as U+00B5 or U+03BC, and Go takes both.
NANOSECONDS = 10**9
GO_DURATION_UNITS = {
    "ns": 1,
    "us": 10**3,
    "\u00b5s": 10**3,
    "\u03bcs": 10**3,
    "ms": 10**6,
    "s": NANOSECONDS,
    "m": 60 * NANOSECONDS,
    "h": 3600 * NANOSECONDS,
}
_UNIT_NAMES = ("ns", "us", "ms", "s", "m", "h")  # as an error message lists them
# One "<number><unit>" of a duration: "1h", "1.5h", ".5h", "5.h" (as Go reads them).
_GO_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")


class EnvConfigError(ValueError):
    """An environment variable is missing or malformed; the message names it."""


def required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise EnvConfigError(f"{name} must be set")
    return value


def integer(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise EnvConfigError(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise EnvConfigError(f"{name}={value} is outside {low}..{high}")
    return value


def seconds(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name, "").strip()
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise EnvConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise EnvConfigError(f"{name}={raw} is outside {low:g}..{high:g} seconds")
    return value


def go_duration(text: str) -> int:
    """The nanoseconds in `text`, a duration as Go's time.ParseDuration reads it ("24h",
    "90m", "1h30m", "1.5h", "300ms"; "0" is the one without a unit), never negative: this
    is for lifetimes and timeouts. Pure; a ValueError says what is wrong."""
    if text.startswith("-"):
        raise ValueError("a negative duration is not allowed")
    rest = text[1:] if text.startswith("+") else text
    if rest == "0":
        return 0
    if not rest:
        raise ValueError("it is empty")
    total, pos = 0, 0
    while pos < len(rest):
        part = _GO_PART.match(rest, pos)
        assert part is not None  # every group may be empty, so it always matches
        whole, fraction, unit = part.group(1), part.group(2), part.group(3)
        if not whole and not fraction:
            raise ValueError(f"a number is missing before {rest[pos:]!r}")
        number = rest[pos : part.start(3)]
        if not unit:
            # Go too: a bare number other than 0 is not a duration (seconds? minutes?).
            raise ValueError(f"{number!r} has no unit ({', '.join(_UNIT_NAMES)})")
        scale = GO_DURATION_UNITS.get(unit)
        if scale is None:
            raise ValueError(f"unknown unit {unit!r} (units: {', '.join(_UNIT_NAMES)})")
        total += int(whole or "0") * scale
        if fraction:
            total += int(fraction) * scale // 10 ** len(fraction)  # truncated, as Go does
        pos = part.end()
    return total


def duration_seconds(env: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    """`name` as a Go duration (Istio's spelling, e.g. SECRET_TTL=24h) in whole seconds
    within low..high, or None when it is not set."""
    raw = env.get(name, "").strip()
    if raw == "":
        return None
    try:
        nanoseconds = go_duration(raw)
    except ValueError as e:
        raise EnvConfigError(
            f"{name}={raw!r} is not a duration like 24h, 90m or 1h30m: {e}"
        ) from None
    value, part = divmod(nanoseconds, NANOSECONDS)
    if part:
        raise EnvConfigError(f"{name}={raw!r} is not a whole number of seconds")
    if not low <= value <= high:
        raise EnvConfigError(f"{name}={raw} ({value} s) is outside {low}..{high} seconds")
    return value


def ttl_seconds(
    env: Mapping[str, str],
    seconds_name: str,
    duration_name: str,
    default: int,
    low: int,
    high: int,
) -> int:
    """A lifetime set either in seconds (`seconds_name`, ours) or as a Go duration
    (`duration_name`, Istio's), each within low..high. Both set must agree: which of two
    different values was meant cannot be known, so neither is picked."""
    as_seconds = env.get(seconds_name, "") != ""
    value = integer(env, seconds_name, default, low, high)
    as_duration = duration_seconds(env, duration_name, low, high)
    if as_duration is None:
        return value
    if as_seconds and value != as_duration:
        raise EnvConfigError(
            f"{seconds_name}={value} and {duration_name}={env[duration_name].strip()} "
            f"({as_duration} s) disagree: set one of them"
        )
    return as_duration


def boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise EnvConfigError(f"{name}={raw!r} is not a boolean (true or false)")


def log_level(env: Mapping[str, str], name: str = "LOG_LEVEL") -> str:
    level = env.get(name, "info").lower()
    if level not in LOG_LEVELS:
        raise EnvConfigError(f"{name}={level!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def limit_names(kind: type[Any], prefix: str) -> dict[str, str]:
    """Environment variable -> field of the limits dataclass `kind`."""
    return {f"{prefix}{f.name.upper()}": f.name for f in dataclasses.fields(kind)}


def limits_from_env(
    env: Mapping[str, str], prefix: str, base: T, others: Collection[str] = ()
) -> T:
    """`base` (a frozen dataclass of positive numbers) with every `<prefix><FIELD>` the
    environment sets; an unknown name with the prefix is an error (a typo must not leave a
    protection at a value nobody chose), except `others`: settings of the same prefix that
    are not limits (upstream's, which a user may carry over). A field whose default is a
    float is read as seconds; one whose default is an int or None (no limit) as an
    integer."""
    names = limit_names(type(base), prefix)
    changes: dict[str, Any] = {}
    for name, field in names.items():
        raw = env.get(name, "").strip()
        if not raw:
            continue
        default = getattr(base, field)
        try:
            value = float(raw) if isinstance(default, float) else int(raw)
        except ValueError:
            kind = "a number of seconds" if isinstance(default, float) else "an integer"
            raise EnvConfigError(f"{name}={raw!r} is not {kind}") from None
        if value == 0 and field in getattr(base, "ZERO_MEANS_NONE", ()):
            pass  # a field that bounds something we choose to do, not a protection
        elif not (value > 0 and math.isfinite(value)):
            # Zero would switch a protection off; a limit is a positive number.
            raise EnvConfigError(f"{name}={raw!r} must be greater than 0")
        changes[field] = value
    for name in env:
        if name.startswith(prefix) and name not in names and name not in others:
            raise EnvConfigError(
                f"{name} is not a setting ({prefix} settings: {', '.join(sorted(names))})"
            )
    result: T = dataclasses.replace(base, **changes)  # type: ignore[type-var]
    return result


def hbone_limit_names() -> dict[str, str]:
    """Environment variable -> HboneLimits field."""
    return limit_names(HboneLimits, HBONE_PREFIX)


def hbone_limits(env: Mapping[str, str], base: HboneLimits = DEFAULT_LIMITS) -> HboneLimits:
    """`base` with every `HBONE_<FIELD>` the environment sets."""
    return limits_from_env(env, HBONE_PREFIX, base)
