"""Reading what users hand the CLI (cluster files, policy files, stdin): bounded, text only.

Every input is capped BEFORE it is parsed: a YAML parser holds many times the file's size
in memory, so a 50 MB file costs a minute and a gigabyte before any check could refuse it.
Real cluster and policy files are a few kilobytes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import BinaryIO

MAX_INPUT_BYTES = 1 << 20  # 1 MiB: cluster file, policy file, stdin


class InputError(ValueError):
    """An input cannot be used; the message names it and says why."""


def read_text(path: Path | str, what: str, limit: int = MAX_INPUT_BYTES) -> str:
    """The UTF-8 text of a file (or of stdin for "-"), refused if larger than `limit`."""
    if str(path) == "-":
        return _decode(_read_capped(sys.stdin.buffer, limit, f"{what} (stdin)"), f"{what} (stdin)")
    p = Path(path)
    name = f"{what} {p}"
    try:
        with p.open("rb") as f:
            data = _read_capped(f, limit, name)
    except IsADirectoryError:
        raise InputError(f"{name} is a directory, not a file") from None
    except OSError as e:
        raise InputError(f"cannot read {name}: {e.strerror or e}") from None
    return _decode(data, name)


def _read_capped(f: BinaryIO, limit: int, name: str) -> bytes:
    # One byte past the limit tells "too large" without reading (or holding) the rest.
    data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{name} is larger than the {_size(limit)} limit for inputs")
    return data


def _decode(data: bytes, name: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{name} is not a text file (not UTF-8)") from None
    if "\x00" in text:
        raise InputError(f"{name} is not a text file (it contains NUL bytes)")
    return text


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n} bytes"
