"""Reading a proxy's settings from its environment: the typed readers both proxies share.

Each proxy writes its variable names and defaults once, in its own `config` module, and
parses them with these pure functions of a mapping; an error names the variable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from meshcore.hbone.limits import DEFAULT_LIMITS, HboneLimits

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


def hbone_limit_names() -> dict[str, str]:
    """Environment variable -> HboneLimits field."""
    return {f"{HBONE_PREFIX}{f.name.upper()}": f.name for f in dataclasses.fields(HboneLimits)}


def hbone_limits(env: Mapping[str, str], base: HboneLimits = DEFAULT_LIMITS) -> HboneLimits:
    """`base` with every `HBONE_<FIELD>` the environment sets; an unknown HBONE_ name is an
    error (a typo must not leave a protection at a value nobody chose)."""
    changes: dict[str, Any] = {}
    for name, field in hbone_limit_names().items():
        raw = env.get(name, "").strip()
        if not raw:
            continue
        default = getattr(base, field)
        try:
            value = int(raw) if isinstance(default, int) else float(raw)
        except ValueError:
            kind = "an integer" if isinstance(default, int) else "a number of seconds"
            raise EnvConfigError(f"{name}={raw!r} is not {kind}") from None
        if not (value > 0 and math.isfinite(value)):
            # Zero would switch a protection off; a limit is a positive number.
            raise EnvConfigError(f"{name}={raw!r} must be greater than 0")
        changes[field] = value
    for name in env:
        if name.startswith(HBONE_PREFIX) and name not in hbone_limit_names():
            raise EnvConfigError(
                f"{name} is not a setting (HBONE_ settings: "
                f"{', '.join(sorted(hbone_limit_names()))})"
            )
    return dataclasses.replace(base, **changes)
