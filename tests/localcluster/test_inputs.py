"""Inputs are capped before they are parsed, and must be text."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

from localcluster.inputs import MAX_INPUT_BYTES, InputError, read_text


def test_a_file_at_the_limit_is_read(tmp_path: Path) -> None:
    p = tmp_path / "f.yaml"
    p.write_text("a" * MAX_INPUT_BYTES)
    assert len(read_text(p, "cluster file")) == MAX_INPUT_BYTES


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"a" * (MAX_INPUT_BYTES + 1), "is larger than the 1 MiB limit"),
        (b"name: \xff\xfe\n", "is not a text file (not UTF-8)"),
        (b"name: x\x00\n", "is not a text file (it contains NUL bytes)"),
    ],
    ids=["one byte over", "not utf-8", "nul bytes"],
)
def test_refused(tmp_path: Path, data: bytes, says: str) -> None:
    p = tmp_path / "f.yaml"
    p.write_bytes(data)
    with pytest.raises(InputError, match=re.escape(f"cluster file {p} {says}")):
        read_text(p, "cluster file")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"cannot read policy file .*No such file"):
        read_text(tmp_path / "absent.yaml", "policy file")
    with pytest.raises(InputError, match="is a directory"):
        read_text(tmp_path, "policy file")


def test_stdin_is_capped_too(monkeypatch: pytest.MonkeyPatch) -> None:
    big = io.TextIOWrapper(io.BytesIO(b"x" * (MAX_INPUT_BYTES + 10)))
    monkeypatch.setattr(sys, "stdin", big)
    with pytest.raises(InputError, match=r"policy file \(stdin\) is larger"):
        read_text("-", "policy file")
