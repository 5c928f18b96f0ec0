"""A proxy process's `main`: settings from the environment, logging, the event loop, and
exit codes (2: the settings are wrong, 1: it failed while running, 0: it stopped)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import structlog

from meshcore.envconfig import EnvConfigError
from meshcore.observability import logging as meshlog
from meshcore.runtime.profile import profile_dir, profiled
from meshcore.state import MeshConfigError

C = TypeVar("C")


def run_process(
    name: str,
    parse: Callable[[Mapping[str, str]], C],
    log_level: Callable[[C], str],
    run: Callable[[C], Coroutine[Any, Any, None]],
) -> int:
    try:
        cfg = parse(os.environ)
        profiles = profile_dir(os.environ)
    except EnvConfigError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    meshlog.configure(log_level(cfg))
    try:
        import uvloop  # the event loop; plain asyncio works, uvloop is about 2x faster

        uvloop.install()
    except ImportError:
        pass
    try:
        with profiled(name, profiles):
            asyncio.run(run(cfg))
    except (MeshConfigError, OSError) as e:
        structlog.get_logger(name).error(f"{name} failed", error=str(e))
        return 1
    return 0
