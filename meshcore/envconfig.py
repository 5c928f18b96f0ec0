"""Reading a proxy's settings from its environment: the typed readers both proxies share.

Each proxy writes its variable names and defaults once, in its own `config` module, and
parses them with these pure functions of a mapping; an error names the variable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

from meshcore.hbone.limits import DEFAULT_LIMITS, HboneLimits

T = TypeVar("T")

HBONE_PREFIX = "HBONE_"
LOG_LEVELS = ("debug", "info", "warning", "error")


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
        if not (value > 0 and math.isfinite(value)):
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
