"""The layering rules that `make test` enforces (pyproject's [tool.importlinter], run there as
`lint-imports`), and what import-linter cannot see: import cycles, and what the tunnel process
has actually loaded."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]

with open(ROOT / "pyproject.toml", "rb") as _f:
    PACKAGES: list[str] = tomllib.load(_f)["tool"]["importlinter"]["root_packages"]

# What the tunnel process must never load: ~9 MB (cryptography), ~14 MB (aiohttp), and the
# waypoint's L7 libraries, which a tunnel has no use for.
HEAVY = (
    "cryptography",
    "aiohttp",
    "prometheus_client",
    "httptools",
    "re2",
    "jwt",
    "opentelemetry",
    "google.protobuf",
    "grpc",
)


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph.modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.find_modules_directly_imported_by(nxt)))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def _graph() -> grimp.ImportGraph:
    # No cache: the unprivileged tier cannot write one into the checkout.
    return grimp.build_graph(*PACKAGES, exclude_type_checking_imports=False, cache_dir=None)


def test_the_cycle_finder_finds_a_seeded_cycle():
    graph = grimp.ImportGraph()
    for a, b in [("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d"), ("p.e", "p.e")]:
        graph.add_import(importer=a, imported=b)
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_no_import_cycle():
    # An import under TYPE_CHECKING counts: it is still a dependency of the design (a
    # protocol breaks a cycle; a deferred import only hides it).
    assert _cycles(_graph()) == []


# What a fresh interpreter holds after importing the tunnel's entry point and every module
# of the tunnel package (a superset of what `python -m ztunnel` loads before it serves).
TUNNEL_IMPORTS = """
import importlib, json, pkgutil, sys
import ztunnel, ztunnel.__main__
for info in pkgutil.walk_packages(ztunnel.__path__, "ztunnel."):
    importlib.import_module(info.name)
heavy = sys.argv[1:]
loaded = [m for m, mod in sys.modules.items() if mod is not None]  # None: marked absent
print(json.dumps(sorted(m for m in loaded if m.split(".")[0] in heavy)))
"""


def test_the_tunnel_process_loads_no_heavy_library():
    done = subprocess.run(
        [sys.executable, "-c", TUNNEL_IMPORTS, *HEAVY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_the_probe_sees_a_heavy_import():
    # The same probe, with a module that does load one of them: it would tell.
    done = subprocess.run(
        [sys.executable, "-c", TUNNEL_IMPORTS.replace("ztunnel.__main__", "aiohttp"), *HEAVY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "aiohttp" in json.loads(done.stdout)


def _importlinter_section() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    start = re.search(r"^\[tool\.importlinter\]", text, re.M)
    assert start is not None
    end = re.compile(r"^\[(?!\[?tool\.importlinter)", re.M).search(text, start.end())
    return text[start.start() : end.start() if end else len(text)]


SEEDED = {
    # the core imports the tunnel; the tunnel imports aiohttp through the core
    "meshcore/__init__.py": "import ztunnel\n",
    "meshcore/observability.py": "import aiohttp\n",
    "ztunnel/__init__.py": "import meshcore.observability\n",
    # what the tunnel contract's ignore_imports names, so that it matches something
    "meshcore/identity/__init__.py": "",
    "meshcore/identity/certs.py": "from meshcore.identity import certcrypto\n",
    "meshcore/identity/certcrypto.py": "import cryptography\n",
    # the waypoint imports the tunnel
    "waypoint/__init__.py": "import ztunnel\n",
}


def test_the_contracts_catch_seeded_violations(tmp_path: Path):
    (tmp_path / "pyproject.toml").write_text(_importlinter_section())
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    for path, text in SEEDED.items():
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text(text)
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint), "--no-cache", "--config", "pyproject.toml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        # Wide enough that no contract name is wrapped.
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "COLUMNS": "300"},
    )
    assert done.returncode == 1, done.stdout + done.stderr
    broken = {line.removesuffix(" BROKEN") for line in done.stdout.splitlines()}
    assert any(line.startswith("The tunnel process never loads cryptography") for line in broken)
    assert any(line.startswith("The waypoint imports only the core") for line in broken)
    assert any(line.startswith("The core imports no proxy") for line in broken), done.stdout


# What a waypoint loads only when its config asks for it: the JWT library and the
# cryptography behind it (about 20 MB resident) for a RequestAuthentication, protobuf for
# OTLP traces; aiohttp and prometheus_client never. Its idle memory is a target (60 MB).
WAYPOINT_IMPORTS = """
import json, sys
import waypoint.__main__, waypoint.instance, waypoint.router, waypoint.l7config
heavy = sys.argv[1:]
loaded = [m for m, mod in sys.modules.items() if mod is not None]  # None: marked absent
print(json.dumps(sorted({m.split(".")[0] for m in loaded if m.split(".")[0] in heavy})))
"""
WAYPOINT_LAZY = (
    "cryptography",
    "jwt",
    "opentelemetry",
    "google",
    "aiohttp",
    "prometheus_client",
    "rich",
)


def test_the_waypoint_loads_jwt_and_protobuf_only_when_configured():
    done = subprocess.run(
        [sys.executable, "-c", WAYPOINT_IMPORTS, *WAYPOINT_LAZY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
