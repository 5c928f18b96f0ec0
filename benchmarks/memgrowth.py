"""Does memory grow per connection? The loopback mesh of newconn_loopback.py (no root) driven
in batches of new connections; after each batch, with the cyclic garbage collected, the
process's RSS, Python's allocated blocks, glibc's heap (in use, free), pymalloc's arenas,
the count of every GC-tracked type and (--tracemalloc) the allocation sites that grew.

A leak is something that grows with the connections made: blocks or a type's count rising
batch after batch by about the same step. Memory the allocators keep (free heap glibc has
not returned, arenas pymalloc cannot release) shows as RSS above what is in use while the
counts stay flat; --trim calls malloc_trim after each batch to show how much of the RSS is
that. --variant VAR=VALUE runs the same batches again in a child process with VAR set
(e.g. MALLOC_ARENA_MAX=1) and prints each run's figures side by side.

Every loop is bounded: --batches batches of --batch connections, each connection with a
10 s timeout, and no batch started after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from newconn_loopback import LoopbackMesh, loopback_mesh, run_clients  # noqa: E402

from meshcore.hbone.transport import _ReadBuffer  # noqa: E402
from meshcore.observability import logging as meshlog  # noqa: E402
from meshcore.relay import _AppReadBuffer  # noqa: E402
from meshcore.runtime import malloc  # noqa: E402

# ---- pure: reading the allocators' figures and comparing samples ----


def type_growth(
    before: dict[str, int], after: dict[str, int], top: int, min_delta: int = 1
) -> list[tuple[str, int]]:
    """The types whose count rose most from `before` to `after` (largest first)."""
    grown = [(k, after.get(k, 0) - before.get(k, 0)) for k in after.keys() | before.keys()]
    grown = [(k, d) for k, d in grown if d >= min_delta]
    return sorted(grown, key=lambda kd: (-kd[1], kd[0]))[:top]


def per_connection(delta: float, connections: int) -> float:
    return delta / connections if connections else 0.0


# ---- the measurements ----


def _lent() -> dict[str, int]:
    """Receive buffers set aside while a view of them is queued (kept for reuse, at most
    MAX_LENT_BUFFERS of each kind): app reads (1 MiB each) and TLS reads (256 KiB)."""
    return {"lent_app": len(_AppReadBuffer.lent), "lent_tls": len(_ReadBuffer.lent)}


def _status_kb(field_name: str) -> int:
    (value,) = malloc.status_bytes(field_name)
    return (value or 0) // 1024


@dataclass
class Sample:
    connections: int
    seconds: float
    rss_kb: int
    hwm_kb: int
    blocks: int
    gc_objects: int
    threads: int
    alloc: dict[str, int]
    rss_after_trim_kb: int | None = None
    trim_ms: float | None = None


def sample(
    connections: int, started: float, trim: bool, types_to: Path, snap_to: Path | None
) -> Sample:
    """Everything after a full collection. The type histogram goes to `types_to` and the
    tracemalloc snapshot (if tracing) to `snap_to`, both written last: held in memory they
    would be what grows (a histogram is ~500 blocks, a snapshot ~10^5 tuples)."""
    gc.collect()
    blocks = sys.getallocatedblocks()
    objs = gc.get_objects()
    types = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in objs)
    n_objs = len(objs)
    del objs
    s = Sample(
        connections=connections,
        seconds=time.monotonic() - started,
        rss_kb=_status_kb("VmRSS"),
        hwm_kb=_status_kb("VmHWM"),
        blocks=blocks,
        gc_objects=n_objs,
        threads=len(os.listdir("/proc/self/task")),
        alloc={**malloc.heap(), **malloc.pymalloc_arenas(), **_lent()},
    )
    if trim:
        t0 = time.perf_counter()
        malloc.trim()
        s.trim_ms = (time.perf_counter() - t0) * 1000
        s.rss_after_trim_kb = _status_kb("VmRSS")
    types_to.write_text(json.dumps(types))
    del types
    if snap_to is not None:
        tracemalloc.take_snapshot().dump(str(snap_to))
    return s


async def hold(mesh: LoopbackMesh, n: int) -> list[socket.socket]:
    """`n` cross-node connections opened 64 at a time and left open (each connect bounded
    by 10 s); the ones that failed are left out."""
    held: list[socket.socket] = []
    for start in range(0, n, 64):
        got = await asyncio.gather(
            *(mesh.hold() for _ in range(min(64, n - start))), return_exceptions=True
        )
        held.extend(g for g in got if isinstance(g, socket.socket))
    return held


async def settle(mesh: LoopbackMesh, held: int = 0, limit: float = 5.0) -> None:
    """Until the tunnels' tables hold only the held connections (the others' relays
    closed, their log lines written), at most `limit` seconds; then one more short wait
    for the last close callbacks. A held connection is in both tables (two reporters)."""
    deadline = time.monotonic() + limit
    # Polled: the tables have no event for "empty", and this is the benchmark, not the path.
    while time.monotonic() < deadline and sum(len(n.connections()) for n in mesh.nodes) > 2 * held:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)


async def run(a: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    started = time.monotonic()
    samples: list[Sample] = []
    sites: list[str] = []
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        first, last = Path(tmp, "first.snap"), Path(tmp, "last.snap")

        def types(i: int) -> Path:
            return Path(tmp, f"types-{i}.json")

        async with loopback_mesh() as mesh:
            make = mesh.paths[a.path]
            await run_clients(a.warmup, a.workers, make)  # pools dialled, caches filled
            held = await hold(mesh, a.held)
            await settle(mesh, held=len(held))
            if a.tracemalloc:
                tracemalloc.start(a.frames)
            if held:
                print(f"{len(held)} connections held open", file=out)
            base = sample(0, started, a.trim, types(0), first if a.tracemalloc else None)
            samples.append(base)
            print_header(out)
            print_row(base, base, out)
            made = 0
            for _ in range(a.batches):
                if time.monotonic() - started > a.max_seconds:
                    print(f"stopped: --max-seconds {a.max_seconds} reached", file=out)
                    break
                failed += await run_clients(a.batch, a.workers, make)
                made += a.batch
                await settle(mesh, held=len(held))
                s = sample(
                    made, started, a.trim, types(len(samples)), last if a.tracemalloc else None
                )
                samples.append(s)
                print_row(s, base, out)
        if a.tracemalloc:
            tracemalloc.stop()
            sites = grown_sites(first, last, a.frames, a.top)
        histograms = [json.loads(types(i).read_text()) for i in range(len(samples))]
    summary = summarize(samples, histograms, failed, a.top)
    summary["sites"] = sites
    print_summary(summary, out)
    return summary


def grown_sites(first: Path, last: Path, frames: int, top: int) -> list[str]:
    """The allocation sites that hold more at the last sample than at the baseline."""
    if not last.exists():
        return []
    after, before = tracemalloc.Snapshot.load(str(last)), tracemalloc.Snapshot.load(str(first))
    out = []
    for st in after.compare_to(before, "traceback" if frames > 1 else "lineno")[:top]:
        if st.size_diff <= 0:
            break
        where = "; ".join(str(f) for f in st.traceback[:frames])
        out.append(f"{st.size_diff / 1024:+9.1f} KiB {st.count_diff:+8d} blocks  {where}")
    return out


def summarize(
    samples: list[Sample], histograms: list[dict[str, int]], failed: int, top: int
) -> dict[str, Any]:
    """Growth over the whole run and over its second half: what grows in both, by about
    the same amount per connection, is per connection; what grew only early was filling."""
    base, last = samples[0], samples[-1]
    mid = samples[len(samples) // 2]
    h0, hm, hl = histograms[0], histograms[len(samples) // 2], histograms[-1]
    n, n2 = last.connections, last.connections - mid.connections
    return {
        "connections": n,
        "failed": failed,
        "samples": [asdict(s) for s in samples],
        "rss_kb": (base.rss_kb, last.rss_kb),
        "blocks_per_conn": per_connection(last.blocks - base.blocks, n),
        "blocks_per_conn_second_half": per_connection(last.blocks - mid.blocks, n2),
        "objects_per_conn": per_connection(last.gc_objects - base.gc_objects, n),
        "objects_per_conn_second_half": per_connection(last.gc_objects - mid.gc_objects, n2),
        "types_grown": type_growth(h0, hl, top),
        "types_grown_second_half": type_growth(hm, hl, top),
    }


def print_header(out: TextIO) -> None:
    print(
        f"{'conns':>7}{'s':>6}{'RSS MB':>8}{'dRSS':>7}{'trim':>7}{'ms':>5}{'HWM':>7}{'blocks':>9}"
        f"{'dblk':>7}{'gc objs':>9}{'dobj':>7}{'heap use':>9}{'heap free':>10}"
        f"{'mmap':>7}{'arenas':>7}{'lent':>6}{'thr':>4}",
        file=out,
    )


def print_row(s: Sample, base: Sample, out: TextIO) -> None:
    mb = 1024.0
    al = s.alloc
    trim = "-" if s.rss_after_trim_kb is None else f"{s.rss_after_trim_kb / mb:.1f}"
    trim_ms = "-" if s.trim_ms is None else f"{s.trim_ms:.1f}"
    print(
        f"{s.connections:>7}{s.seconds:>6.0f}{s.rss_kb / mb:>8.1f}"
        f"{(s.rss_kb - base.rss_kb) / mb:>+7.1f}{trim:>7}{trim_ms:>5}{s.hwm_kb / mb:>7.1f}"
        f"{s.blocks:>9}{s.blocks - base.blocks:>+7}{s.gc_objects:>9}"
        f"{s.gc_objects - base.gc_objects:>+7}"
        f"{al.get('heap_in_use', 0) / 2**20:>9.1f}{al.get('heap_free', 0) / 2**20:>10.1f}"
        f"{al.get('mmapped', 0) / 2**20:>7.1f}{al.get('arenas', '-'):>7}"
        f"{al.get('lent_app', 0):>3}/{al.get('lent_tls', 0):<2}{s.threads:>4}",
        file=out,
        flush=True,
    )


def print_summary(sm: dict[str, Any], out: TextIO) -> None:
    n = sm["connections"]
    print(
        f"\n{n} connections after the baseline ({sm['failed']} failed); per connection: "
        f"blocks {sm['blocks_per_conn']:+.4f} "
        f"(second half {sm['blocks_per_conn_second_half']:+.4f}), "
        f"GC objects {sm['objects_per_conn']:+.4f} "
        f"(second half {sm['objects_per_conn_second_half']:+.4f})",
        file=out,
    )
    for title, rows in (
        ("types grown, baseline -> last", sm["types_grown"]),
        ("types grown, middle -> last", sm["types_grown_second_half"]),
    ):
        print(f"\n{title}:", file=out)
        for name, d in rows or [("(none)", 0)]:
            print(f"  {d:+8d}  {name}", file=out)
    if sm["sites"]:
        print("\nallocation sites grown, baseline -> last (tracemalloc):", file=out)
        for line in sm["sites"]:
            print(f"  {line}", file=out)


def without_variants(argv: list[str]) -> list[str]:
    """The command line less its --variant options (`--variant X` and `--variant=X`)."""
    out: list[str] = []
    skip = False
    for x in argv:
        if skip:
            skip = False
        elif x == "--variant":
            skip = True
        elif not x.startswith("--variant="):
            out.append(x)
    return out


def run_variants(a: argparse.Namespace, argv: list[str], out: TextIO) -> int:
    """The same batches in child processes, one per environment (the default first), one
    after the other; glibc reads its MALLOC_* settings only when a process starts."""
    base_args = without_variants(argv)
    variants = ["", *a.variant]
    results: list[tuple[str, dict[str, Any]]] = []
    for v in variants:
        env = dict(os.environ)
        if v:
            name, _, value = v.partition("=")
            env[name] = value
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            print(f"\n=== {v or 'default environment'}", file=out, flush=True)
            cmd = [sys.executable, __file__, *base_args, "--json", tmp.name]
            done = subprocess.run(cmd, env=env, timeout=a.max_seconds + 300, check=False)
            if done.returncode != 0:
                print(f"{v or 'default'}: exit {done.returncode}", file=out)
                continue
            results.append((v or "default", json.loads(Path(tmp.name).read_text())))
    print(f"\n{'environment':<32}{'RSS base MB':>12}{'RSS last MB':>12}{'growth MB':>10}", file=out)
    for v, r in results:
        b, last = r["rss_kb"]
        print(f"{v:<32}{b / 1024:>12.1f}{last / 1024:>12.1f}{(last - b) / 1024:>+10.1f}", file=out)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--path", choices=("cross-node", "same-node", "direct"), default="cross-node")
    ap.add_argument("--batch", type=int, default=2000, help="new connections per batch")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=16, help="connections in flight")
    ap.add_argument(
        "--held",
        type=int,
        default=0,
        help="cross-node connections kept open (0..4000: four descriptors each here)",
    )
    ap.add_argument("--max-seconds", type=float, default=900.0)
    ap.add_argument("--tracemalloc", action="store_true", help="allocation sites (slower)")
    ap.add_argument("--frames", type=int, default=1, help="tracemalloc frames per site")
    ap.add_argument("--trim", action="store_true", help="malloc_trim after each sample")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--variant", action="append", default=[], metavar="VAR=VALUE")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--log-level", default="info", help="warning: no access-log lines")
    a = ap.parse_args()
    if not (
        1 <= a.batch <= 100_000
        and 1 <= a.batches <= 200
        and 0 <= a.warmup <= 100_000
        and 1 <= a.workers <= 256
        and 0 <= a.held <= 4000
        and 1 <= a.frames <= 20
        and 0 < a.max_seconds <= 7200
    ):
        ap.error("--batch 1..100000, --batches 1..200, --warmup 0..100000, --workers 1..256")
    if any("=" not in v for v in a.variant):
        ap.error("--variant VAR=VALUE")
    if a.variant:
        return run_variants(a, sys.argv[1:], sys.stdout)
    import uvloop

    meshlog.configure(a.log_level)
    report = sys.stdout
    # The access log goes to /dev/null, as in newconn_loopback.py: its cost and memory count.
    with (
        open(os.devnull, "w") as null,
        contextlib.redirect_stdout(null),
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        summary = runner.run(run(a, report))
    if a.json:
        Path(a.json).write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
