"""Golden outputs: a view rendered from fixed data must equal the file
`tests/ambientctl/golden/<name>.txt`. `UPDATE_GOLDEN=1` rewrites the files instead (review
the diff before committing)."""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN_DIR = Path(__file__).parent / "golden"


def check(name: str, text: str) -> None:
    path = GOLDEN_DIR / f"{name}.txt"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.is_file(), f"no golden file {path} (run with UPDATE_GOLDEN=1 to write it)"
    want = path.read_text(encoding="utf-8")
    assert text == want, f"output differs from {path} (UPDATE_GOLDEN=1 rewrites it):\n{text}"
