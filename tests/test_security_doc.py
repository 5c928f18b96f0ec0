"""SECURITY.md backs each "cannot" with a test named `tests/<file>.py::<test>`: a renamed or
deleted test must not leave a claim pointing at nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_test_security_md_cites_exists() -> None:
    refs = REFERENCE.findall((ROOT / "SECURITY.md").read_text())
    assert len(refs) > 50, "SECURITY.md cites its tests as `tests/<file>.py::<test>`"
    missing = [
        f"{file}::{name}"
        for file, name in sorted(set(refs))
        if not (ROOT / file).is_file() or name not in defined_tests(ROOT / file)
    ]
    assert missing == []
