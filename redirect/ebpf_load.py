"""Compile and load the capture programs with bcc, once per build per process.

A loaded tc program is not tied to a network namespace (its socket lookups use the netns of
the packet's device), so one load serves every pod of the node; the fds stay open for the
life of the process, and each attached filter holds its own reference to the program.

bcc is imported here only, on first use, so nodes in iptables mode never need it.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class LoadError(RuntimeError):
    """bcc is missing, or the programs did not compile or load."""


@dataclass(frozen=True, slots=True)
class Programs:
    """Loaded programs of one build: function name -> program fd."""

    build: str
    fds: Mapping[str, int]


_lock = threading.Lock()
# build -> (the bcc module object, which owns the fds, and what it loaded)
_loaded: dict[str, tuple[Any, Programs]] = {}


def programs(build: str, source: str, flags: Sequence[str], functions: Sequence[str]) -> Programs:
    """The loaded programs for `build` (compiled from `source` with `flags` on first use)."""
    with _lock:
        hit = _loaded.get(build)
        if hit is not None:
            return hit[1]
        bcc = _bcc()
        try:
            # bcc wants bytes for its text and names (str is deprecated there).
            module = bcc.BPF(text=source.encode(), cflags=list(flags))
        except Exception as e:  # bcc raises bare Exception; its compiler output went to stderr
            raise LoadError(f"compiling the capture programs failed: {e}") from None
        try:
            fds = {f: int(module.load_func(f.encode(), bcc.BPF.SCHED_CLS).fd) for f in functions}
        except Exception as e:  # the verifier's log is in the message
            module.cleanup()
            raise LoadError(f"loading the capture programs failed: {e}") from None
        loaded = Programs(build, fds)
        _loaded[build] = (module, loaded)
        return loaded


def _bcc() -> Any:
    try:
        return importlib.import_module("bcc")
    except ImportError as e:
        raise LoadError(f"bcc is not importable: {e}") from None
