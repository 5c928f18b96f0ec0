"""L4 data-path benchmark: pod -> pod over three paths, measured in one run on one cluster.

Paths (client pod on node1, server pod on node2, see bench-cluster.yaml):
- `direct`: pods in a namespace outside the mesh; plain TCP over the veths and bridges.
- `tunnel`: pods in an ambient namespace; both node tunnels, HBONE over mTLS.
- `relay`: the `direct` pods joined by two plain TCP relays (apps/relay.py, uvloop), one
  in each node's netns: the same two user-space hops as the tunnel, without TLS or HBONE.

Per path and round (--rounds, paths interleaved; the table shows medians over rounds):
single-connection throughput (up to --bytes, stopped after --seconds) and 1 KB echo
latency, open loop at a fixed --rate over one keep-alive connection. Only ratios taken in
the same run mean anything (absolute numbers drift between runs on a VM). During the
throughput run, the CPU of each hop's process (the two tunnels, the two relays, the
server app) is read from /proc and given as seconds per GB, user and system apart: on a
shared machine that, not the wall rate, says what a byte costs. With --profile DIR the
tunnels run under cProfile (meshcore.runtime.profile) and leave their profiles there.

Invariants: needs root; uses its own state root (a temp dir) and always tears the cluster
down, also on SIGINT or SIGTERM (then it exits 130 / 143); every process it starts is
recorded and stopped by PID; all traffic stays inside the cluster's namespaces; every client
run is bounded by a subprocess timeout.
Raw results go to benchmarks/results/l4-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cpusplit  # benchmarks/, beside this script
from benchrun import header, on_cluster, write_results

import nsutil
from localcluster.apps import INHERITED_ENV, process_name
from localcluster.interrupt import run_interruptible
from localcluster.mesh import Cluster, tunnel_name
from localcluster.processes import ManagedProcess, read_records, spawn_in_netns
from meshcore.defaults import TUNNEL_MARK
from meshcore.runtime.profile import PROFILE_ENV

HERE = Path(__file__).resolve().parent
CLUSTER_FILE = HERE / "bench-cluster.yaml"
CLIENT = HERE / "apps" / "l4_client.py"
RELAY = HERE / "apps" / "relay.py"

SINK_PORT = 5001  # as in bench-cluster.yaml
ECHO_PORT = 5002
RELAY_SINK_PORT = 6001
RELAY_ECHO_PORT = 6002
PLAIN_NS = "plain"
MESH_NS = "mesh"
CLIENT_POD = "client-0"
SERVER_POD = "server-0"

TARGET_TUNNEL_OVER_RELAY = 0.7
TARGET_ADDED_P99_MS = 0.15


class BenchError(RuntimeError):
    """The benchmark could not run; the message says what to check."""


@dataclass(frozen=True, slots=True)
class Params:
    bytes: int
    seconds: float
    rate: float
    latency_seconds: float
    size: int
    rounds: int
    perf: Path | None = None  # where `perf record` files go (first round), or None


@dataclass(frozen=True, slots=True)
class Target:
    """Where one path's client runs and what it connects to."""

    name: str
    client_netns: str
    host: str
    sink_port: int
    echo_port: int
    # The processes a byte of this path goes through, by role: their CPU per GB is reported.
    procs: tuple[tuple[str, int], ...] = ()


# --- pure: ratios and the table ----------------------------------------------------------


def ratios(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    tput = {k: v["throughput"]["gbit_per_s"] for k, v in results.items()}
    p99 = {k: v["latency"]["p99_ms"] for k, v in results.items()}
    return {
        "tunnel_over_relay_throughput": tput["tunnel"] / tput["relay"],
        "tunnel_over_direct_throughput": tput["tunnel"] / tput["direct"],
        "relay_over_direct_throughput": tput["relay"] / tput["direct"],
        "tunnel_added_p99_ms": p99["tunnel"] - p99["direct"],
        "relay_added_p99_ms": p99["relay"] - p99["direct"],
    }


def format_table(results: dict[str, dict[str, dict[str, float]]], r: dict[str, float]) -> str:
    head = f"{'path':<8} {'Gbit/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    head += f" {'req/s':>8}"
    lines = [head, "-" * len(head)]
    for name, res in results.items():
        t, lat = res["throughput"], res["latency"]
        lines.append(
            f"{name:<8} {t['gbit_per_s']:>8.2f} {lat['p50_ms']:>8.3f} {lat['p90_ms']:>8.3f} "
            f"{lat['p99_ms']:>8.3f} {lat['max_ms']:>8.3f} {lat['achieved_rps']:>8.0f}"
        )
    tr = r["tunnel_over_relay_throughput"]
    added = r["tunnel_added_p99_ms"]
    lines += [
        "",
        f"tunnel/relay throughput   {tr:6.2f}  (target >= {TARGET_TUNNEL_OVER_RELAY}: "
        f"{'met' if tr >= TARGET_TUNNEL_OVER_RELAY else 'NOT met'})",
        f"tunnel/direct throughput  {r['tunnel_over_direct_throughput']:6.2f}",
        f"relay/direct throughput   {r['relay_over_direct_throughput']:6.2f}",
        f"tunnel added p99          {added:6.3f} ms  (target <= {TARGET_ADDED_P99_MS} ms: "
        f"{'met' if added <= TARGET_ADDED_P99_MS else 'NOT met'})",
        f"relay added p99           {r['relay_added_p99_ms']:6.3f} ms",
    ]
    return "\n".join(lines)


def format_cpu(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Per hop's process during the throughput run: CPU seconds per GB, user and system,
    and per MB its minor page faults and read / write system calls."""
    head = (
        f"{'path':<8} {'process':<12} {'user s/GB':>10} {'sys s/GB':>10} {'total s/GB':>11}"
        f" {'faults/MB':>10} {'reads/MB':>9} {'writes/MB':>10}"
    )
    lines = [head, "-" * len(head)]
    for name, res in results.items():
        cpu = res.get("cpu_per_gb", {})
        for role in dict.fromkeys(k.split(".", 1)[0] for k in cpu):
            user, system = cpu[f"{role}.user_s_per_gb"], cpu[f"{role}.system_s_per_gb"]
            lines.append(
                f"{name:<8} {role:<12} {user:>10.2f} {system:>10.2f} {user + system:>11.2f}"
                f" {cpu.get(f'{role}.minflt_per_mb', 0.0):>10.1f}"
                f" {cpu.get(f'{role}.reads_per_mb', 0.0):>9.1f}"
                f" {cpu.get(f'{role}.writes_per_mb', 0.0):>10.1f}"
            )
    return "\n".join(lines)


# --- I/O -----------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_client(target: Target, mode: str, args: list[str], timeout: float) -> dict[str, float]:
    port = target.sink_port if mode == "throughput" else target.echo_port
    argv = [sys.executable, str(CLIENT), mode, "--host", target.host, "--port", str(port), *args]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            timeout=timeout,
            env=_env(),
            preexec_fn=nsutil.preexec_enter(target.client_netns),
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{target.name} {mode}: client did not finish in {timeout:.0f} s") from e
    if done.returncode != 0:
        raise BenchError(
            f"{target.name} {mode}: client failed ({done.returncode}): "
            f"{done.stderr.decode(errors='replace').strip()[-2000:]}"
        )
    doc = json.loads(done.stdout)
    if not isinstance(doc, dict):
        raise BenchError(f"{target.name} {mode}: client printed {done.stdout!r}, not an object")
    return {str(k): float(v) for k, v in doc.items()}


def start_perf(out: Path, path: str, procs: dict[str, int]) -> list[subprocess.Popen[bytes]]:
    """`perf record` (samples, no call graphs: Python has no frame pointers) on each of the
    path's proxies, one file per process: where their CPU goes at the C and kernel level."""
    started = []
    for role, pid in procs.items():
        if role == "server-app":
            continue
        data = out / f"perf-{path}-{role}.data"
        argv = ["perf", "record", "-q", "-F", "999", "-p", str(pid), "-o", str(data)]
        started.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    return started


def stop_perf(started: list[subprocess.Popen[bytes]]) -> None:
    for proc in started:
        proc.send_signal(signal.SIGINT)  # perf writes its file and exits on SIGINT
    for proc in started:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(target: Target, p: Params, first: bool = False) -> dict[str, dict[str, float]]:
    print(f"  [{target.name}] warm-up", flush=True)
    run_client(target, "throughput", ["--bytes", str(1 << 20), "--seconds", "5"], 30.0)
    print(f"  [{target.name}] throughput", flush=True)
    pids = dict(target.procs)
    perf = start_perf(p.perf, target.name, pids) if p.perf is not None and first else []
    before = cpusplit.sample(pids)
    try:
        tput = run_client(
            target,
            "throughput",
            ["--bytes", str(p.bytes), "--seconds", str(p.seconds)],
            p.seconds + 60.0,
        )
    finally:
        stop_perf(perf)
    # The client waits for the server's last acknowledgement: every hop has done its work.
    cpu = cpusplit.costs(before, cpusplit.sample(pids), tput["bytes"])
    print(f"[{target.name}] latency", flush=True)
    lat = run_client(
        target,
        "latency",
        ["--rate", str(p.rate), "--seconds", str(p.latency_seconds), "--size", str(p.size)],
        p.latency_seconds + 60.0,
    )
    return {"throughput": tput, "latency": lat, "cpu_per_gb": _flat(cpu)}


def _flat(cpu: dict[str, dict[str, float]]) -> dict[str, float]:
    """{role: {metric: v}} as {"role.metric": v}: every result kind is one flat mapping."""
    return {f"{role}.{metric}": v for role, m in cpu.items() for metric, v in m.items()}


def _wait_listening(netns_path: str, host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fd = nsutil.open_netns(netns_path)
        try:
            s = nsutil.socket_in(fd)
        finally:
            os.close(fd)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, TUNNEL_MARK)
            s.settimeout(0.5)
            s.connect((host, port))
            return
        except OSError:
            time.sleep(0.1)
        finally:
            s.close()
    raise BenchError(f"nothing listens on {host}:{port} in {netns_path} after {timeout:.0f} s")


def start_relays(cluster: Cluster) -> list[ManagedProcess]:
    """relay1 (node1 netns) -> relay2 (node2 netns) -> the plain server pod."""
    node1, node2 = cluster.layout.node("node1"), cluster.layout.node("node2")
    server_ip = str(cluster.layout.pod(PLAIN_NS, SERVER_POD).ip)
    hops = [
        ("relay-node2", node2.netns_path, str(node2.ip), server_ip, SINK_PORT, ECHO_PORT),
        (
            "relay-node1",
            node1.netns_path,
            str(node1.ip),
            str(node2.ip),
            RELAY_SINK_PORT,
            RELAY_ECHO_PORT,
        ),
    ]
    started: list[ManagedProcess] = []
    try:
        for name, netns, listen_ip, to_ip, to_sink, to_echo in hops:
            argv = [
                sys.executable,
                str(RELAY),
                "--bind",
                listen_ip,
                "--forward",
                f"{RELAY_SINK_PORT}:{to_ip}:{to_sink}",
                "--forward",
                f"{RELAY_ECHO_PORT}:{to_ip}:{to_echo}",
            ]
            started.append(
                spawn_in_netns(
                    netns,
                    argv,
                    _env(),
                    HERE,
                    cluster.state.log_dir / f"{name}.log",
                    cluster.state.pidfile_dir,
                    name,
                )
            )
            _wait_listening(netns, listen_ip, RELAY_ECHO_PORT)
    except BaseException:
        stop_all(started)
        raise
    return started


def stop_all(procs: list[ManagedProcess]) -> None:
    for proc in procs:
        proc.stop()


def run(p: Params, cluster: Cluster) -> list[dict[str, dict[str, dict[str, float]]]]:
    lay = cluster.layout
    recorded = {r.name: r.pid for r in read_records(cluster.state.pidfile_dir)}

    def pid(name: str) -> int:
        if name not in recorded:
            raise BenchError(f"no recorded process {name!r} (see the cluster's logs)")
        return recorded[name]

    plain_app = ("server-app", pid(process_name(PLAIN_NS, SERVER_POD)))
    # Roles by side: node1's hop is the client side, node2's the server side.
    direct = Target(
        "direct",
        lay.pod(PLAIN_NS, CLIENT_POD).netns_path,
        str(lay.pod(PLAIN_NS, SERVER_POD).ip),
        SINK_PORT,
        ECHO_PORT,
        (plain_app,),
    )
    tunnel = Target(
        "tunnel",
        lay.pod(MESH_NS, CLIENT_POD).netns_path,
        str(lay.pod(MESH_NS, SERVER_POD).ip),
        SINK_PORT,
        ECHO_PORT,
        (
            ("client-side", pid(tunnel_name("node1"))),
            ("server-side", pid(tunnel_name("node2"))),
            ("server-app", pid(process_name(MESH_NS, SERVER_POD))),
        ),
    )
    rounds: list[dict[str, dict[str, dict[str, float]]]] = []
    relays = start_relays(cluster)
    try:
        relay_pid = {proc.record.name: proc.pid for proc in relays}
        relay = Target(
            "relay",
            direct.client_netns,
            str(lay.node("node1").ip),
            RELAY_SINK_PORT,
            RELAY_ECHO_PORT,
            (
                ("client-side", relay_pid["relay-node1"]),
                ("server-side", relay_pid["relay-node2"]),
                plain_app,
            ),
        )
        # Paths interleaved round by round, so drift in the machine's load (it is shared)
        # spreads over all paths instead of biasing the one measured last.
        for i in range(p.rounds):
            print(f"round {i + 1}/{p.rounds}", flush=True)
            rounds.append({t.name: measure(t, p, i == 0) for t in (direct, tunnel, relay)})
    finally:
        stop_all(relays)
    return rounds


def median_results(
    rounds: list[dict[str, dict[str, dict[str, float]]]],
) -> dict[str, dict[str, dict[str, float]]]:
    """Per path and metric, the median over rounds (robust to one disturbed round)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for path, kinds in rounds[0].items():
        out[path] = {}
        for kind in kinds:
            # A metric missing from a round (a process gone mid-run) is left out, not zero.
            common = set.intersection(*(set(r[path][kind]) for r in rounds))
            out[path][kind] = {
                m: statistics.median(r[path][kind][m] for r in rounds)
                for m in sorted(common, key=list(kinds[kind]).index)
            }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--bytes", type=int, default=1 << 30, help="throughput: bytes to send")
    ap.add_argument("--seconds", type=float, default=10.0, help="throughput: time limit")
    ap.add_argument("--rate", type=float, default=1000.0, help="latency: requests per second")
    ap.add_argument("--latency-seconds", type=float, default=5.0, help="latency: duration")
    ap.add_argument("--size", type=int, default=1024, help="latency: request/response bytes")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the table shows medians")
    ap.add_argument(
        "--profile",
        metavar="DIR",
        type=Path,
        help="run the tunnels under cProfile; their profiles land in DIR when they stop "
        "(the figures of such a run are not measurements)",
    )
    ap.add_argument(
        "--perf",
        metavar="DIR",
        type=Path,
        help="in the first round, `perf record` each hop's process during the throughput "
        "run into DIR/perf-<path>-<side>.data (read with perf report --sort dso,sym)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("l4_datapath: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    if args.size != 1024:
        # The server echoes fixed 1 KB messages (apps/l4_server.py MSG).
        print("l4_datapath: --size must be 1024 (the server's message size)", file=sys.stderr)
        return 2
    if not 1 <= args.rounds <= 20:
        print("l4_datapath: --rounds must be 1..20", file=sys.stderr)
        return 2
    if args.profile is not None:
        args.profile = args.profile.resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
        os.environ[PROFILE_ENV] = str(args.profile)  # inherited by the cluster's processes
    if args.perf is not None:
        if shutil.which("perf") is None:
            print("l4_datapath: --perf needs perf (Debian's linux-perf)", file=sys.stderr)
            return 2
        args.perf = args.perf.resolve()
        args.perf.mkdir(parents=True, exist_ok=True)
    p = Params(
        args.bytes,
        args.seconds,
        args.rate,
        args.latency_seconds,
        args.size,
        args.rounds,
        args.perf,
    )
    state_root = Path(tempfile.mkdtemp(prefix="l4bench-"))
    rounds = on_cluster("l4_datapath", CLUSTER_FILE, state_root, lambda c: run(p, c), BenchError)
    if rounds is None:
        return 1
    results = median_results(rounds)
    r = ratios(results)
    command = shlex.join([sys.executable, *sys.argv])
    doc = {
        **header("l4_datapath", command),
        "params": {**asdict(p), "perf": str(p.perf) if p.perf else None},
        "results": results,  # medians over the rounds
        "rounds": rounds,
        "ratios": r,
        "targets": {
            "tunnel_over_relay_throughput_min": TARGET_TUNNEL_OVER_RELAY,
            "tunnel_added_p99_ms_max": TARGET_ADDED_P99_MS,
        },
    }
    path = write_results(doc, "l4")
    print()
    print(format_table(results, r))
    print()
    print(format_cpu(results))
    print()
    print(f"raw results: {path}")
    print(f"command: {command}")
    if args.profile is not None:
        print(f"profiles: {args.profile} (python -m pstats <file>; sort tottime)")
    return 0


if __name__ == "__main__":
    sys.exit(run_interruptible(main, "l4_datapath"))
