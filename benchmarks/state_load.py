"""Mesh-state benchmark: loading the LOCAL_XDS document and looking things up in it.

For each size N (workloads), a realistic document is generated in memory: N/10 services,
each workload the endpoint of one service (ten pods each), a few pod labels, 20 namespaces,
8 nodes, one policy per namespace; entries shaped like the ones `localcluster.xds` writes.
Per size and format (JSON, and YAML up to --yaml-max-size), one fresh child process
measures:

- parse+build: `parse_local_config(text)` wall time, median of --repeats runs, with the
  cyclic GC on and the previous snapshot alive, as in the tunnel;
- memory, per workload (services and policies included, divided by N): `B/wl` is what
  the resulting `MeshState` retains, the tracemalloc total of the blocks allocated while
  parsing that are still alive once the document is gone (the text was allocated before
  tracing started, so it does not count); `peak` is the most traced at once during the
  parse (document and state together). As a cross-check, the process's RSS growth after
  the first parse (`RSS1`) and after the last (`RSSn`, the old snapshot dropped each time):
  memory the parsed document held stays with the process, so RSS sits near the peak, not
  near the retained size;
- lookups: `workload_by_ip`, `service_by_vip` and `workload_by_uid` with fresh key
  objects, as a caller building them from a socket address would have: per call, median
  over --rounds rounds of --keys random keys (hits only).

A child per measurement keeps one size's garbage and allocator state out of the next one's
RSS. Printed: a table, the lookup ratios largest/smallest size (O(1) lookups give ~1; the
extra above 1 is cache misses in bigger tables) and one JSON line with everything. Only
ratios from one run mean much on a shared machine; nothing here asserts a time.
`--top K` adds the K source lines holding the most retained memory at the largest size.

Invariants: every loop is bounded by a count (sizes, repeats, rounds, keys); each child
has a timeout; nothing is written to disk and nothing listens on the network.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import linecache
import os
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from meshcore.discovery import parse_local_config
from meshcore.state import MeshState

REPO = Path(__file__).resolve().parent.parent

NAMESPACES = (
    "default",
    "payments",
    "checkout",
    "catalog",
    "search",
    "recommendations",
    "identity",
    "notifications",
    "billing",
    "inventory",
    "shipping",
    "analytics",
    "frontend",
    "gateway",
    "reviews",
    "media",
    "messaging",
    "observability",
    "batch-jobs",
    "legacy",
)
# The last two namespaces are outside the mesh: their pods are plain TCP.
PLAIN_NAMESPACES = frozenset(NAMESPACES[-2:])
NODES = 8
PODS_PER_SERVICE = 10
TRUST_DOMAIN = "cluster.local"
CLUSTER_ID = "cluster1"
NETWORK = ""  # single-network cluster, as localcluster writes it

DEFAULT_SIZES = (1_000, 100_000)
# YAML through PyYAML's C loader: ~0.13 s for 1k workloads but ~35 s for 100k (the cyclic
# GC's share grows with the heap), and ~20 KB per workload at the peak; hence opt-in.
DEFAULT_YAML_MAX_SIZE = 10_000
CHILD_TIMEOUT_S = 600.0


# -- the document -----------------------------------------------------------------------------


def _hex(rng: random.Random, length: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(length))


def generate_document(n: int, seed: int = 1) -> dict[str, Any]:
    """A LOCAL_XDS document with `n` workloads; the same `n` and `seed` give the same document."""
    rng = random.Random(seed)
    n_services = max(1, n // PODS_PER_SERVICE)
    vip_base = int(ipaddress.IPv4Address("10.96.0.0"))
    services: list[dict[str, Any]] = []
    # Per service: (namespace, app name, service key, port map, ReplicaSet hash per version).
    apps: list[tuple[str, str, str, dict[int, int], tuple[str, str]]] = []
    for j in range(n_services):
        ns = NAMESPACES[j % len(NAMESPACES)]
        app = f"app-{j}"
        host = f"{app}.{ns}.svc.cluster.local"
        ports = {80: 8080} if j % 3 else {80: 8080, 9090: 9090}
        apps.append((ns, app, f"{ns}/{host}", ports, (_hex(rng, 10), _hex(rng, 10))))
        services.append(
            {
                "name": app,
                "namespace": ns,
                "hostname": host,
                "vips": [f"{NETWORK}/{ipaddress.IPv4Address(vip_base + 1 + j)}"],
                "ports": ports,
                "subjectAltNames": [],
            }
        )

    # Each node gets its own /11 of pod IPs (room for 2M pods per node).
    pod_base = int(ipaddress.IPv4Address("10.0.0.0"))
    next_on_node = [2] * NODES
    workloads: list[dict[str, Any]] = []
    used_names: set[str] = set()
    for i in range(n):
        ns, app, key, ports, hashes = apps[i % n_services]
        version = 1 if rng.random() < 0.8 else 2
        rs_hash = hashes[version - 1]
        deployment = f"{app}-v{version}"
        pod = f"{deployment}-{rs_hash}-{_hex(rng, 5)}"
        for _ in range(100):  # Kubernetes retries a clashing suffix too
            if pod not in used_names:
                break
            pod = f"{deployment}-{rs_hash}-{_hex(rng, 5)}"
        else:
            raise RuntimeError(f"no free pod name for {deployment}")
        used_names.add(pod)
        node = rng.randrange(NODES)
        ip = ipaddress.IPv4Address(pod_base + (node << 21) + next_on_node[node])
        next_on_node[node] += 1
        workloads.append(
            {
                "uid": f"{CLUSTER_ID}//Pod/{ns}/{pod}",
                "name": pod,
                "namespace": ns,
                "serviceAccount": app,
                "trustDomain": TRUST_DOMAIN,
                "workloadIps": [str(ip)],
                "protocol": "TCP" if ns in PLAIN_NAMESPACES else "HBONE",
                "node": f"node-{node}",
                "canonicalName": app,
                "canonicalRevision": f"v{version}",
                "workloadName": deployment,
                "workloadType": "pod",
                "clusterId": CLUSTER_ID,
                "status": "Healthy",
                "services": {key: ports},
                "labels": {"app": app, "version": f"v{version}", "pod-template-hash": rs_hash},
            }
        )

    policies = [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "allow-same-namespace", "namespace": ns},
            "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": [ns]}}]}]},
        }
        for ns in NAMESPACES
        if ns not in PLAIN_NAMESPACES
    ]
    return {"workloads": workloads, "services": services, "policies": policies}


def render(doc: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(doc, separators=(",", ":"))
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    # Block style, as a person or a generator would write the file.
    return yaml.dump(doc, Dumper=dumper, default_flow_style=False, sort_keys=False)


# -- measurements (child process) -------------------------------------------------------------


def _rss_bytes() -> int | None:
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _growth(before: int | None, after: int | None, n: int) -> float | None:
    return None if before is None or after is None else (after - before) / n


def _per_call_ns(call: Callable[[Any], object], keys: Sequence[Any], rounds: int) -> float:
    """Median over `rounds` of the mean time per call over all `keys`, in ns."""
    per_round: list[float] = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for key in keys:
            call(key)
        per_round.append((time.perf_counter_ns() - start) / len(keys))
    return statistics.median(per_round)


def _lookups(state: MeshState, n_keys: int, rounds: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    workloads = state.workloads
    services = state.services
    picked = [workloads[rng.randrange(len(workloads))] for _ in range(n_keys)]
    picked_svcs = [services[rng.randrange(len(services))] for _ in range(n_keys)]
    # Fresh objects, not the ones inside the state: a dict hit on the very same object
    # skips the equality check, which a real caller (parsing a socket address) never gets.
    ip_keys = [ipaddress.ip_address(str(w.ips[0])) for w in picked]
    vip_keys = [ipaddress.ip_address(str(s.vips[0].ip)) for s in picked_svcs]
    uid_keys = ["".join(list(w.uid)) for w in picked]
    network = NETWORK
    for w, ip in zip(picked, ip_keys, strict=True):  # a miss would be a broken benchmark
        if state.workload_by_ip(network, ip) is not w:
            raise RuntimeError(f"lookup of {ip} did not find {w.uid}")
    by_ip, by_vip, by_uid = state.workload_by_ip, state.service_by_vip, state.workload_by_uid
    return {
        "ip_ns": _per_call_ns(lambda ip: by_ip(network, ip), ip_keys, rounds),
        "vip_ns": _per_call_ns(lambda ip: by_vip(network, ip), vip_keys, rounds),
        "uid_ns": _per_call_ns(by_uid, uid_keys, rounds),
    }


def _top_lines(diff: list[tracemalloc.StatisticDiff], k: int, n: int) -> list[dict[str, Any]]:
    out = []
    for stat in diff[:k]:
        frame = stat.traceback[0]
        try:
            where = str(Path(frame.filename).resolve().relative_to(REPO))
        except ValueError:
            where = frame.filename
        out.append(
            {
                "where": f"{where}:{frame.lineno}",
                "code": linecache.getline(frame.filename, frame.lineno).strip(),
                "bytes_per_workload": round(stat.size_diff / n, 1),
                "blocks_per_workload": round(stat.count_diff / n, 2),
            }
        )
    return out


def measure(n: int, fmt: str, repeats: int, n_keys: int, rounds: int, top: int) -> dict[str, Any]:
    doc = generate_document(n)
    text = render(doc, fmt)
    del doc
    gc.collect()

    # Parse+build. As in the tunnel, the snapshot in force stays alive while the next one is
    # built (so the collector walks it too) and is dropped once the new one replaces it.
    # RSS (the text stays alive throughout) after the first parse, and after the last one:
    # memory freed by a parse is reused by the next, so that is about the steady state.
    times: list[float] = []
    rss_first: int | None = None
    rss_before = _rss_bytes()
    state: MeshState | None = None
    for i in range(repeats):
        gc.collect()
        start = time.perf_counter()
        new_state = parse_local_config(text)
        times.append(time.perf_counter() - start)
        state = new_state
        del new_state
        if i == 0:
            gc.collect()
            rss_first = _rss_bytes()
    gc.collect()
    rss_last = _rss_bytes()
    state = None
    gc.collect()

    # Retained memory: only blocks allocated after tracing starts are counted, so the text
    # (allocated before) does not, and the parsed document (freed on return) does not either.
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    state = parse_local_config(text)
    del text
    gc.collect()
    # The peak holds the document and the state at once: it, not the retained size, is what
    # the process's RSS has to reach. Read before the snapshot below adds its own objects.
    peak = tracemalloc.get_traced_memory()[1]
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    not_tracemalloc = [tracemalloc.Filter(False, tracemalloc.__file__)]
    diff = after.filter_traces(not_tracemalloc).compare_to(
        before.filter_traces(not_tracemalloc), "lineno"
    )
    retained = sum(stat.size_diff for stat in diff)
    top_lines = _top_lines(diff, top, n)
    del before, after, diff

    lookups = _lookups(state, n_keys, rounds, seed=n)
    return {
        "workloads": n,
        "services": len(state.services),
        "format": fmt,
        "parse_s": statistics.median(times),
        "parse_runs_s": [round(t, 4) for t in times],
        "retained_bytes_per_workload": retained / n,
        "peak_bytes_per_workload": peak / n,
        "rss_growth_bytes_per_workload": _growth(rss_before, rss_first, n),
        "rss_growth_after_repeats_bytes_per_workload": _growth(rss_before, rss_last, n),
        **lookups,
        "top_lines": top_lines,
    }


# -- driver -----------------------------------------------------------------------------------


def _run_child(n: int, fmt: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        f"{n}:{fmt}",
        "--repeats",
        str(args.repeats),
        "--keys",
        str(args.keys),
        "--rounds",
        str(args.rounds),
        "--top",
        str(args.top),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if proc.returncode != 0:
        raise SystemExit(f"measurement of {n} workloads ({fmt}) failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of ints") from None
    if not sizes or any(s < 10 for s in sizes):
        raise argparse.ArgumentTypeError("sizes must be at least 10 workloads")
    return sorted(set(sizes))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _fmt_bytes(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'workloads':>10} {'fmt':>4} {'parse s':>8} {'us/wl':>6} {'B/wl':>6} "
        f"{'peak B/wl':>9} {'RSS1 B/wl':>9} {'RSSn B/wl':>9} "
        f"{'ip ns':>6} {'vip ns':>6} {'uid ns':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['workloads']:>10,} {r['format']:>4} {r['parse_s']:>8.3f} "
            f"{r['parse_s'] / r['workloads'] * 1e6:>6.1f} "
            f"{_fmt_bytes(r['retained_bytes_per_workload']):>6} "
            f"{_fmt_bytes(r['peak_bytes_per_workload']):>9} "
            f"{_fmt_bytes(r['rss_growth_bytes_per_workload']):>9} "
            f"{_fmt_bytes(r['rss_growth_after_repeats_bytes_per_workload']):>9} "
            f"{r['ip_ns']:>6.0f} {r['vip_ns']:>6.0f} {r['uid_ns']:>6.0f}"
        )


def _ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    # Lookups do not depend on the format the state came from; use one format throughout.
    fmt = "json" if any(r["format"] == "json" for r in rows) else "yaml"
    same = [r for r in rows if r["format"] == fmt]
    if len(same) < 2:
        return {}
    small, large = same[0], same[-1]
    return {
        f"{kind}_{large['workloads']}_over_{small['workloads']}": large[f"{kind}_ns"]
        / small[f"{kind}_ns"]
        for kind in ("ip", "vip", "uid")
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_sizes, default=list(DEFAULT_SIZES))
    parser.add_argument("--format", choices=("json", "yaml", "both"), default="both")
    parser.add_argument(
        "--yaml-max-size",
        type=int,
        default=DEFAULT_YAML_MAX_SIZE,
        help="largest size measured as YAML (default %(default)s; 100000 takes ~30 s per parse)",
    )
    parser.add_argument("--repeats", type=_positive, default=3, help="parse runs per size")
    parser.add_argument("--keys", type=_positive, default=4096, help="random keys per round")
    parser.add_argument("--rounds", type=_positive, default=15, help="lookup rounds")
    parser.add_argument("--top", type=int, default=0, help="top K lines by retained memory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        size, _, fmt = args.child.partition(":")
        result = measure(int(size), fmt, args.repeats, args.keys, args.rounds, args.top)
        print(json.dumps(result))
        return 0

    plan: list[tuple[int, str]] = []
    for n in args.sizes:
        if args.format in ("json", "both"):
            plan.append((n, "json"))
        if args.format in ("yaml", "both") and n <= args.yaml_max_size:
            plan.append((n, "yaml"))
    if not plan:
        parser.error("nothing to measure: raise --yaml-max-size or use --format json")

    rows = []
    for n, fmt in plan:
        print(f"measuring {n:,} workloads ({fmt}) ...", file=sys.stderr, flush=True)
        rows.append(_run_child(n, fmt, args))

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus; per-call lookup times")
    _print_table(rows)
    ratios = _ratios(rows)
    for name, value in ratios.items():
        print(f"lookup ratio {name}: {value:.2f}")
    if args.top:
        largest = max(rows, key=lambda r: (r["workloads"], r["format"] == "json"))
        print(
            f"\nretained memory by source line, {largest['workloads']:,} workloads "
            f"({largest['format']}):"
        )
        for line in largest["top_lines"]:
            print(
                f"{line['bytes_per_workload']:>8.1f} B/wl {line['blocks_per_workload']:>6.2f} "
                f"blocks/wl  {line['where']}  {line['code']}"
            )
    summary = {
        "benchmark": "state_load",
        "python": sys.version.split()[0],
        "rows": [{k: v for k, v in r.items() if k != "top_lines"} for r in rows],
        "lookup_ratios": ratios,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
