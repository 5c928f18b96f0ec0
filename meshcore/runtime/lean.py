"""Imported first by each proxy's `__main__`, before anything that imports structlog: keeps
a library no proxy uses out of its memory. structlog formats tracebacks with `rich` when it
is installed (the development tools bring it in), which costs a proxy process about 5 MB
resident for output it never writes; marked absent, structlog formats them plainly."""

import sys

sys.modules.setdefault("rich", None)  # type: ignore[arg-type]  # None: "not installed"
