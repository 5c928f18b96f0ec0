"""What every target shares: how it is found, its seeds, and where its files live."""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import cast

from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent
CORPUS = ROOT / "corpus"
CRASHES = ROOT / "crashes"

TestOneInput = Callable[[bytes], None]


def module(name: str) -> ModuleType:
    if name not in TARGETS:
        raise KeyError(f"no fuzz target {name!r}; targets: {', '.join(TARGETS)}")
    return importlib.import_module(f"fuzz.targets.{name}")


def entry(name: str) -> TestOneInput:
    return cast(TestOneInput, module(name).test_one_input)


def seeds(name: str) -> Mapping[str, bytes]:
    return cast(Mapping[str, bytes], module(name).seeds())


def replay_files() -> list[tuple[str, Path]]:
    """Every seed and every crash kept so far, as (target, file): the regression cases."""
    out: list[tuple[str, Path]] = []
    for name in TARGETS:
        for base in (CORPUS, CRASHES):
            folder = base / name
            if folder.is_dir():
                out += [(name, p) for p in sorted(folder.iterdir()) if p.is_file()]
    return out


def crash_name(data: bytes) -> str:
    """libFuzzer's name for a crashing input, so a kept one and a new one look alike."""
    return "crash-" + hashlib.sha1(data).hexdigest()
