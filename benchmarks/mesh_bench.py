"""Mesh cost benchmark: what each mesh architecture costs the same requests, in one run.

Scenarios (meshbench/): `none` (no mesh), `ambient` (node tunnels, HBONE mTLS), `relay`
(two plain TCP relays: ambient's hops without TLS), and, when their modules import,
`sidecar` (a tunnel per pod), `sidecar-haproxy` (HAProxy pairs) and `ambient-waypoint`
(ambient plus a waypoint bound to the server's Service); each in the
cross-node and same-node placement. Per scenario and placement: single-connection bulk
throughput, open-loop HTTP/1.1 latency at fixed rates (1 KB each way, keep-alive), proxy
CPU per 1000 requests and RSS (from /proc), new connections per second, new mTLS handshakes
per second at the destination side (see HBONE_NOTE), and proxy memory per open idle
connection. The plain scenarios share one cluster; the others bring up their own. Every
scenario is started once and stays up for the whole run: latency is measured in
interleaved rounds (each round runs every scenario's rate steps in turn, so a disturbance
of the shared machine hits one round of every row, not one row), a round whose `none`
baseline is itself disturbed is measured again (meshbench/rounds.py), and the report gives
the median over rounds with its spread. The one-off phases (throughput, memory per
connection, connection churn, handshakes) follow the rounds. The load generator, the
server app and the proxies may be pinned to stated CPUs (--pin), the same for every
scenario, and the generator's own CPU is recorded for every rate step.

Writes benchmarks/results/<timestamp>/: results.json (raw, with latency histograms),
report.md (a table per metric, ratios to `none` and ambient to `sidecar`, the targets of
issue 5), and PNG plots. The earlier benchmarks (rbac_check, state_load) run in quick
settings and join the report. Needs root; every process it starts is stopped by PID.
Interrupted (SIGINT, SIGTERM), it tears down the clusters it built and exits 130 / 143.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import platform
import selectors
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

from meshbench import costs, plain, report, rounds
from meshbench.rounds import DEFAULT_RULE, DisturbanceRule
from meshbench.scenario import Endpoint, Running, Scenario

import nsutil
from localcluster.apps import INHERITED_ENV
from localcluster.interrupt import run_interruptible
from localcluster.mesh import MeshUpError
from meshcore.defaults import METRICS_PORT

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
OPTIONAL = ("sidecar", "haproxy", "ambient_waypoint")  # modules skipped if they do not import
PHASE_GRACE = 60.0  # seconds a load subprocess may run beyond its own bound
HBONE_NOTE = (
    "mTLS handshakes: the tunnel pools HBONE connections per (source identity, destination "
    "identities, destination, source IP), as upstream, so the app's new TCP connections ride "
    "existing mTLS connections; the row 'Connections the source tunnel opened per second' "
    "counts istio_tcp_connections_opened (reporter=source) on the client's tunnel, i.e. new "
    "HBONE streams. The row 'New mTLS handshakes per second (HBONE CONNECT answered)' is "
    "measured apart, at the destination side: worker processes in the client pod's netns "
    "each open a new TCP connection to the server pod's 15008 (ambient: the server node's "
    "tunnel; sidecar: the server pod's sidecar), with the tunnel's SO_MARK so the pod's "
    "capture lets it through as it does the source tunnel's own connections (unmarked, it "
    "would be redirected to the client's tunnel, which refuses port 15008), do a full TLS "
    "1.3 handshake with a client certificate of the client pod's identity from the "
    "cluster's CA, check the server's SPIFFE identity, send an HTTP/2 CONNECT for the app's "
    "port, wait for the 200 (sent once the server reached the app) and close. "
    "sidecar-haproxy: the same to the server-side HAProxy's TLS port with its client "
    "certificate, and one small HTTP/1.1 request to the app instead of the CONNECT. Rows "
    "beside it give the load generator's CPU (cores busy) and the accepting proxy's CPU per "
    "handshake (times the rate: its cores busy). The proxy is the limit when it is near one "
    "core busy (one event loop; one HAProxy thread); below that, the client, the proxy, the "
    "app and the kernel shared the machine's cores and the figure is the machine's."
)
WAYPOINT_NOTE = (
    "ambient-waypoint: the client addresses the server's Service VIP (a waypoint bound to a "
    "Service sees only traffic addressed to it); the tunnels send it to the waypoint (node1), "
    "which parses, routes, logs and counts each HTTP/1.1 request and sends it on over HBONE "
    "to the server's tunnel. Its proxies are the waypoint and the tunnels on the path; the "
    "waypoint rows and targets use the waypoint process alone. The bulk port is not declared "
    "http and passes through the waypoint as TCP. No handshake row: the waypoint's CONNECT "
    "takes a Service authority, which the handshake phase does not send."
)
CONNECT_NOTE = (
    "New connections per second: the load generator keeps 16 connections in flight (16 "
    "threads over 2 processes), each connect, one small request with `Connection: close`, "
    "its whole answer, close; the figure is the path's capacity, not one connection's "
    "latency (with 4 in flight, the run before, a tunnel pair left 0.6 of the 2 cores idle "
    "and `none` measured the generator). The client pod reuses TIME-WAIT ports "
    "(tcp_tw_reuse=1). Beside the rate: each connection's time to its whole answer (p50, "
    "p99) with all in flight, the generator's CPU, and the connections the server pod "
    "accepted per new client connection (the kernel's count in its namespace): 1 where each "
    "reaches the app as its own connection, as through any L4 proxy (the tunnels, the "
    "relay); near 0 where an HTTP proxy before the app sends every request over connections "
    "it keeps open (sidecar-haproxy's server side), which spares the app and the kernel a "
    "connection each."
)
IDLE_NOTE = (
    "Idle RSS is sampled when a scenario starts; every scenario starts before any load, so "
    "all of them are cold (ambient's two placements share the same tunnels)."
)
ROUNDS_NOTE = (
    "Latency: each round runs every scenario's rate steps in turn (a rate, then a "
    "placement: its scenarios back to back, odd rounds in reverse order); the clusters stay "
    "up across rounds. A round whose none p99 (per placement and rate) is more than 2x the "
    "median of the other rounds and 0.25 ms above it, or above 5 ms, is flagged, kept in "
    "results.json and the per-round table, left out of the medians, and its slice (every "
    "scenario of that placement and rate) measured again, at most twice. Medians are over "
    "the accepted rounds; the spread beside them is min..max over the same rounds. The "
    "added p99 is taken per round (the mesh minus none of the same round) and its median "
    "reported."
)


@dataclass(frozen=True, slots=True)
class Settings:
    mode: str
    rates: tuple[int, ...]
    http_seconds: float
    conns: int
    bulk_seconds: float
    bulk_bytes: int
    connect_seconds: float
    handshake_seconds: float
    idle_conns: int
    rounds: int
    placements: tuple[str, ...]
    scenarios: tuple[str, ...]  # empty: all registered
    earlier: bool
    pin: str = "off"  # rounds.PIN_LAYOUTS
    rule: DisturbanceRule = DEFAULT_RULE
    # New connections: attempts in flight (threads) and the processes they are spread over.
    # Enough in flight to keep the path under test busy, whatever its latency (four left a
    # tunnel pair waiting: 1.4 of 2 cores busy, each event loop woken per connection); two
    # processes, so that the generator's threads do not queue for one interpreter lock.
    connect_workers: int = 16
    connect_procs: int = 2


# Rounds alternate the scenario order, so neither drift nor position favours a row. Quick:
# 2 rounds (a spread of two values: min..max); full: 3 (a median that one bad round
# cannot move). Quick measures fewer points, each the way full does: the same keep-alive
# connections at 1000 rps (a tail at 8 connections is not the tail at 16) and the same
# seconds of new connections.
QUICK = Settings(
    "quick", (1000,), 3.0, 16, 2.0, 1 << 29, 3.0, 2.0, 2000, 2, plain.PLACEMENTS, (), True
)
FULL = Settings(
    "full", (500, 1000, 2000), 5.0, 16, 4.0, 1 << 31, 3.0, 3.0, 10000, 3, plain.PLACEMENTS, (),
    True,
)  # fmt: skip


class BenchError(RuntimeError):
    """A phase could not run; the message says what to check."""


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- scenario registry ----------------------------------------------------------------------

Factory = Callable[[str], Scenario]


def _factories(module: Any) -> list[tuple[str, Factory]]:
    """A module's scenarios: its `scenarios(placement)` if it has one, else every class it
    defines with a `name` and start/stop, built as `cls(placement)`."""
    listing = getattr(module, "scenarios", None)
    if callable(listing):

        def pick(name: str) -> Factory:
            def build(placement: str) -> Scenario:
                chosen: Scenario = next(s for s in listing(placement) if s.name == name)
                return chosen

            return build

        return [(str(s.name), pick(str(s.name))) for s in listing(plain.PLACEMENTS[0])]
    out: list[tuple[str, Factory]] = []
    for _, cls in inspect.getmembers(module, inspect.isclass):
        name = getattr(cls, "name", None)
        if (
            cls.__module__ == module.__name__
            and isinstance(name, str)
            and callable(getattr(cls, "start", None))
            and callable(getattr(cls, "stop", None))
        ):
            out.append((name, cast(Factory, cls)))
    return out


def registry() -> tuple[list[tuple[str, Factory]], list[dict[str, str]]]:
    found: list[tuple[str, Factory]] = _factories(plain)
    skipped: list[dict[str, str]] = []
    for mod in OPTIONAL:
        try:
            module = importlib.import_module(f"meshbench.{mod}")
        except Exception as e:  # any import failure: the row is skipped, the run goes on
            skipped.append({"scenario": mod, "reason": f"module does not import: {e!r}"})
            continue
        got = _factories(module)
        if not got:
            skipped.append({"scenario": mod, "reason": "module defines no scenario"})
        found += got
    return found, skipped


# --- running the load generator in the client pod ---------------------------------------------


def _env() -> dict[str, str]:
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))
    return env


def _argv(mode: str, ep: Endpoint, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "meshbench.loadgen", mode,
        "--host", ep.host, "--port", str(ep.port), *extra,
    ]  # fmt: skip


def loadgen(
    mode: str, ep: Endpoint, extra: list[str], bound: float, cpus: frozenset[int] | None
) -> dict[str, Any]:
    """Run the load generator in the client pod's netns (pinned to `cpus` if given)."""
    try:
        done = subprocess.run(
            _argv(mode, ep, extra),
            capture_output=True,
            timeout=bound + PHASE_GRACE,
            env=_env(),
            cwd=HERE,
            preexec_fn=_enter_pinned(ep.netns, cpus),
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{mode}: load generator did not finish in time") from e
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()[-1500:]
        raise BenchError(f"{mode}: load generator failed ({done.returncode}): {err}")
    doc = json.loads(done.stdout)
    if not isinstance(doc, dict):
        raise BenchError(f"{mode}: load generator printed {done.stdout[:200]!r}")
    return doc


def idle_connections(running: Running, count: int) -> dict[str, Any]:
    """Open `count` idle connections through the scenario and see the proxies' RSS grow."""
    before = costs.sample(running.proxies)
    proc = subprocess.Popen(
        _argv("idle", running.http, ["--count", str(count)]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        cwd=HERE,
        preexec_fn=nsutil.preexec_enter(running.http.netns),
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=30.0 + count / 100):
            raise BenchError("idle: connections not open in time")
        line = proc.stdout.readline()
        opened = json.loads(line) if line else {}
        if not isinstance(opened, dict) or "opened" not in opened:
            err = proc.stderr.read().decode(errors="replace")[-1500:] if proc.stderr else ""
            raise BenchError(f"idle: load generator said {line!r} {err}")
        time.sleep(0.5)  # let the proxies finish their per-connection setup
        after = costs.sample(running.proxies)
        with contextlib.suppress(BrokenPipeError):  # it may have ended: figures are taken
            proc.stdin.write(b"\n")
            proc.stdin.flush()
        proc.wait(timeout=30.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    b, a = costs.rss_total_kb(before), costs.rss_total_kb(after)
    return {
        "requested": count,
        "opened": opened["opened"],
        "failed": opened.get("failed", 0),
        "rss_kb_before": b,
        "rss_kb_after": a,
        "bytes_per_connection": costs.bytes_per_connection(b, a, int(opened["opened"])),
    }


HANDSHAKE_WORKERS = 4  # blocking attempts in flight; two per core of this 2-core machine


def handshakes(running: Running, seconds: float) -> dict[str, Any] | None:
    """New mTLS handshakes per second the destination side accepts (loadgen `handshake`),
    with the client's CPU and the accepting proxy's CPU per handshake."""
    hs = running.handshake
    if hs is None:
        return None
    extra = hs.loadgen_args(seconds, HANDSHAKE_WORKERS)
    roles = {r: running.proxies[r] for r in hs.server_roles if r in running.proxies}
    before = costs.sample(roles)
    res = loadgen("handshake", Endpoint(hs.netns, hs.host, hs.port), extra, seconds, None)
    after = costs.sample(roles)
    n = int(res["handshakes"])
    server = costs.load_costs(before, after, n)["total"]
    cpu = server["cpu_s"]
    res["origin"] = hs.origin
    res["server_roles"] = list(roles)
    res["server_cpu_s"] = cpu
    res["server_cpu_ms_per_handshake"] = cpu * 1000.0 / n if cpu is not None and n else None
    res["server_cpu_cores"] = (
        cpu / res["seconds"] if cpu is not None and res["seconds"] > 0 else None
    )
    return res


def tunnel_opened(running: Running) -> float | None:
    """istio_tcp_connections_opened_total (reporter=source) on the client's node tunnel."""
    if running.tunnel_admin is None:
        return None
    netns = running.tunnel_admin[0]
    try:
        s = nsutil.socket_at(netns)
        try:
            s.settimeout(3.0)
            s.connect(("127.0.0.1", METRICS_PORT))
            s.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        finally:
            s.close()
    except OSError:
        return None
    total = 0.0
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("istio_tcp_connections_opened_total{") and 'reporter="source"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- CPU pinning ---------------------------------------------------------------------------


def pin_pids(pids: list[int], cpus: frozenset[int]) -> None:
    """Every thread of each process onto `cpus` (sched_setaffinity acts on one thread; the
    threads a process starts later inherit its creator's mask). A process that is gone is
    skipped: its figures show up missing elsewhere."""
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)


def _enter_pinned(netns: str, cpus: frozenset[int] | None) -> Callable[[], None]:
    enter = nsutil.preexec_enter(netns)

    def pre() -> None:
        enter()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return pre


# --- scenarios: started once, latency in interleaved rounds, then the one-off phases --------


@dataclass(slots=True)
class Live:
    """A started scenario and its record in results.json (round 0)."""

    name: str
    placement: str
    scn: Scenario
    running: Running
    rec: dict[str, Any]


def latency_step(live: Live, st: Settings, rate: int, plan: rounds.PinPlan) -> dict[str, Any]:
    """One rate step: open-loop HTTP load, the proxies' CPU and RSS over it, and the load
    generator's own CPU (in its result: client_cpu_s, client_cpu_cores)."""
    running = live.running
    if plan:
        pin_pids(running.server, plan[rounds.SERVER])
        pin_pids([p for ps in running.proxies.values() for p in ps], plan[rounds.PROXY])
    before = costs.sample(running.proxies)
    res = loadgen(
        "http", running.http,
        ["--rate", str(rate), "--seconds", str(st.http_seconds), "--conns", str(st.conns)],
        st.http_seconds, plan.get(rounds.LOADGEN),
    )  # fmt: skip
    after = costs.sample(running.proxies)
    res["costs"] = costs.load_costs(before, after, int(res["answered"]))
    res["saturated"] = rounds.saturated(_float(res.get("client_cpu_cores")))
    if plan:  # read back, so the record shows where they actually were allowed to run
        res["pinned"] = {
            "server": _affinity(running.server),
            "proxies": _affinity([p for ps in running.proxies.values() for p in ps]),
        }
    return res


def _affinity(pids: list[int]) -> list[int] | None:
    """The CPUs the first of `pids` may run on (None: none, or gone)."""
    try:
        return sorted(os.sched_getaffinity(pids[0])) if pids else None
    except OSError:
        return None


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) else None


def start_scenarios(
    items: list[tuple[str, Factory, str]],
    st: Settings,
    workdir: Path,
    stack: contextlib.ExitStack,
    runs: list[dict[str, Any]],
) -> list[Live]:
    """Start every scenario (each stays up until `stack` closes), sample idle RSS, warm up.
    A scenario that fails to start is a row with its error, not the end of the run."""
    lives: list[Live] = []
    for i, (name, factory, placement) in enumerate(items):
        tag = f"({i + 1}/{len(items)}) {name} {placement}"
        rec: dict[str, Any] = {"scenario": name, "placement": placement, "round": 0}
        runs.append(rec)
        progress(f"{tag}: starting")
        scn = factory(placement)
        try:
            stack.callback(_stop, scn, tag)
            running = scn.start(workdir)
            tune_client(running.http.netns)
            rec["proxies"] = {k: list(v) for k, v in running.proxies.items()}
            rec["server"] = list(running.server)
            rec["idle"] = {
                role: ({"rss_kb": u.rss_kb} if u else {"rss_kb": None})
                for role, u in costs.sample(running.proxies).items()
            }
            progress(f"{tag}: warm-up")
            loadgen(
                "http", running.http,
                ["--rate", "500", "--seconds", "1", "--conns", str(st.conns)], 1.0, None,
            )  # fmt: skip
            rec["http"] = {}
            lives.append(Live(name, placement, scn, running, rec))
        except Exception as e:  # one failed scenario is a row in the report
            rec["error"] = f"{type(e).__name__}: {e}"
            progress(f"{tag}: FAILED: {rec['error']}")
            traceback.print_exc()
    return lives


# The client pod may reuse a local port whose earlier connection is in TIME-WAIT (TCP
# timestamps make that safe). Without it, once tens of thousands of the generator's own
# closed connections wait there (a second of a fast path's new connections, or the idle
# phase's), every connect() searches the port range for a free one: measured, 0.3 -> 1.5
# cores of generator and a fifth of the rate, which is the client's cost, not the proxy's.
# A load-testing client is set up so; what the proxies and the server see is unchanged.
CLIENT_SYSCTLS = {"net/ipv4/tcp_tw_reuse": "1"}


def tune_client(netns: str) -> None:
    fd = nsutil.open_netns(netns)
    try:
        for name, value in CLIENT_SYSCTLS.items():
            nsutil.write_sysctl(fd, name, value)
    finally:
        os.close(fd)


def _stop(scn: Scenario, tag: str) -> None:
    progress(f"{tag}: stopping")
    scn.stop()


SETTLE_LOOK = 0.25  # seconds of each look at the proxies' CPU while settling


def settle(lives: list[Live]) -> dict[str, float]:
    """Wait (at most rounds.SETTLE_TIMEOUT) until every live scenario's proxies together
    are idle; returns how long it waited and their CPU (cores) over the last look."""
    pids = sorted({p for lv in lives for ps in lv.running.proxies.values() for p in ps})
    start = time.monotonic()
    cores = 0.0
    while True:
        before = costs.sample_each(pids)
        time.sleep(SETTLE_LOOK)
        cpu = costs.cpu_delta(before, costs.sample_each(pids))
        cores = cpu / SETTLE_LOOK
        waited = time.monotonic() - start
        if rounds.settled(cpu, SETTLE_LOOK) or waited >= rounds.SETTLE_TIMEOUT:
            return {"settle_s": waited, "background_cores": cores}


class RoundRecords:
    """Each scenario's record in results.json per round and attempt: round 0's first
    attempt is the scenario's own (`Live.rec`); the others join `runs` when first used."""

    def __init__(self, runs: list[dict[str, Any]]) -> None:
        self.runs = runs
        self._slot: dict[tuple[str, str, int, int], dict[str, Any]] = {}

    def get(self, live: Live, rnd: int, attempt: int = 0) -> dict[str, Any]:
        key = (live.name, live.placement, rnd, attempt)
        if key not in self._slot:
            if rnd == 0 and attempt == 0:
                self._slot[key] = live.rec
            else:
                rec = {"scenario": live.name, "placement": live.placement, "round": rnd,
                       "attempt": attempt, "http": {}}  # fmt: skip
                self.runs.append(rec)
                self._slot[key] = rec
        return self._slot[key]


def _in_turn(lives: list[Live], placement: str, rnd: int) -> list[Live]:
    """A placement's scenarios in the order round `rnd` measures them: odd rounds reversed,
    so neither drift nor position favours a row."""
    order = [lv for lv in lives if lv.placement == placement]
    return order[:: -1 if rnd % 2 else 1]


def run_rounds(st: Settings, lives: list[Live], records: RoundRecords) -> None:
    """Each round measures every scenario at every rate, slice by slice (a rate and a
    placement: all its scenarios back to back), odd rounds in reverse scenario order, so a
    disturbance of the machine hits one round of every row, not every round of one row.
    Then each slice whose `none` p99 was disturbed is measured again (`rounds.repeat_plan`)."""
    plan = rounds.pin_plan(st.pin, sorted(os.sched_getaffinity(0)))
    runs, record = records.runs, records.get

    def measure_slice(rate: int, placement: str, rnd: int, attempt: int) -> None:
        for live in _in_turn(lives, placement, rnd):
            tag = f"round {rnd + 1}" + (f" repeat {attempt}" if attempt else "")
            progress(f"{tag}: {live.name} {live.placement} HTTP {rate} rps x {st.http_seconds:g} s")
            rec = record(live, rnd, attempt)
            try:
                quiet = settle(lives)
                rec["http"][str(rate)] = latency_step(live, st, rate, plan) | quiet
            except Exception as e:  # the other rows of the round still run
                rec["http"][str(rate)] = {"error": f"{type(e).__name__}: {e}"}
                progress(f"{live.name} {live.placement}: FAILED: {e}")

    placements = [p for p in st.placements if any(lv.placement == p for lv in lives)]
    progress(f"CPU layout: {rounds.describe_plan(plan)}")
    for rnd in range(st.rounds):
        progress(f"round {rnd + 1}/{st.rounds}")
        for rate in st.rates:
            for placement in placements:
                measure_slice(rate, placement, rnd, 0)
    # Disturbed baselines: repeat their slice until accepted or out of repeats.
    for rate in st.rates:
        for placement in placements:
            for _ in range(st.rule.max_repeats + 1):
                todo = rounds.repeat_plan(
                    rounds.baseline_attempts(runs, placement, str(rate)), st.rule
                )
                if not todo:
                    break
                for rnd, attempt in todo:
                    progress(f"round {rnd + 1}, {placement} {rate} rps: disturbed baseline, again")
                    measure_slice(rate, placement, rnd, attempt)
            rounds.mark_slices(runs, placement, str(rate), st.rule)


def one_off_phases(live: Live, st: Settings, tag: str, lives: list[Live]) -> None:
    """Throughput and memory per connection: once per scenario, after the latency rounds.
    Each phase starts once every live scenario's proxies are idle (`settle`)."""
    rec, running = live.rec, live.running
    waits: dict[str, float] = rec.setdefault("settle_s", {})
    try:
        waits["bulk"] = round(settle(lives)["settle_s"], 2)
        progress(f"{tag}: bulk throughput ({st.bulk_seconds:g} s)")
        rec["bulk"] = loadgen(
            "bulk", running.bulk,
            ["--bytes", str(st.bulk_bytes), "--seconds", str(st.bulk_seconds)], st.bulk_seconds,
            None,
        )  # fmt: skip
        progress(f"{tag}: {st.idle_conns} idle connections")
        rec["conns"] = idle_connections(running, st.idle_conns)
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {e}"
        progress(f"{tag}: FAILED: {rec['error']}")
        traceback.print_exc()


def churn_phases(
    live: Live, st: Settings, tag: str, lives: list[Live], rec: dict[str, Any]
) -> None:
    """New connections, then new mTLS handshakes, into `rec` (one round's record). A phase
    that fails is recorded as its error; the round's other figures stand.

    Each phase starts once every live scenario's proxies are idle (`settle`): closing the
    idle phase's connections leaves the proxies their ends to work off (10 000 in full
    mode, 2 000 in quick: seconds of a tunnel's CPU, an access log line each), and a
    connection phase started on top of that measured the backlog too, more so in full
    mode (ambient's new connections per second, 3 runs each: 1 408..1 681 after 10 000,
    1 734..1 785 after 2 000)."""
    running = live.running
    waits: dict[str, float] = rec.setdefault("settle_s", {})
    try:
        waits["connect"] = round(settle(lives)["settle_s"], 2)
        progress(f"{tag}: new connections ({st.connect_seconds:g} s)")
        t0 = tunnel_opened(running)
        a0 = costs.passive_opens(running.server[0]) if running.server else None
        extra = ["--seconds", str(st.connect_seconds), "--workers", str(st.connect_workers),
                 "--procs", str(st.connect_procs)]  # fmt: skip
        conn = loadgen("connect", running.http, extra, st.connect_seconds, None)
        t1 = tunnel_opened(running)
        a1 = costs.passive_opens(running.server[0]) if running.server else None
        if t0 is not None and t1 is not None and conn["seconds"] > 0:
            conn["tunnel_opened"] = t1 - t0
            conn["tunnel_opened_per_second"] = (t1 - t0) / conn["seconds"]
        if a0 is not None and a1 is not None and conn["connections"]:
            # Connections accepted in the server pod per new client connection: 1 where
            # each one reaches the app as its own connection (an L4 proxy's must), about
            # 0 where a proxy in front of the app re-uses its connections to it.
            conn["server_accepts"] = a1 - a0
            conn["server_accepts_per_conn"] = (a1 - a0) / conn["connections"]
        rec["connect"] = conn
    except Exception as e:
        rec["connect"] = {"error": f"{type(e).__name__}: {e}"}
        progress(f"{tag}: new connections FAILED: {rec['connect']['error']}")
    if running.handshake is None:
        return
    try:
        waits["handshake"] = round(settle(lives)["settle_s"], 2)
        progress(f"{tag}: new mTLS handshakes ({st.handshake_seconds:g} s)")
        rec["handshake"] = handshakes(running, st.handshake_seconds)
    except Exception as e:
        rec["handshake"] = {"error": f"{type(e).__name__}: {e}"}
        progress(f"{tag}: new mTLS handshakes FAILED: {rec['handshake']['error']}")


def churn_rounds(st: Settings, lives: list[Live], records: RoundRecords) -> None:
    """New connections and handshakes in rounds, as the latency steps: per round and
    placement all scenarios back to back, odd rounds in reverse order. One measurement
    of a few seconds said more about the machine's moment than about the proxy (HAProxy's
    new connections per second moved from 5 900 to 9 600 between short runs, ambient's by
    a tenth): each round's pair is measured side by side, and the targets take the median
    of the rounds' ratios. Last of all the phases: the one most likely to break a proxy."""
    placements = [p for p in st.placements if any(lv.placement == p for lv in lives)]
    for rnd in range(st.rounds):
        progress(f"connection churn, round {rnd + 1}/{st.rounds}")
        for placement in placements:
            for live in _in_turn(lives, placement, rnd):
                tag = f"churn round {rnd + 1}: {live.name} {live.placement}"
                churn_phases(live, st, tag, lives, records.get(live, rnd))
    for live in lives:
        dead = sorted(role for role, u in costs.sample(live.running.proxies).items() if u is None)
        if dead:
            live.rec["dead_proxies"] = dead
            progress(f"{live.name} {live.placement}: proxy process(es) gone by the end: "
                     f"{', '.join(dead)}")  # fmt: skip


def run_all(st: Settings, workdir: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    found, skipped = registry()
    if st.scenarios:
        unknown = set(st.scenarios) - {n for n, _ in found}
        if unknown:
            raise BenchError(f"unknown scenario(s) {sorted(unknown)}; have {[n for n, _ in found]}")
        found = [(n, f) for n, f in found if n in st.scenarios]
    plain_names = {n for n, _ in _factories(plain)}
    items = [(n, f, pl) for pl in st.placements for n, f in found]
    runs: list[dict[str, Any]] = []
    # Every scenario stays up from its start to the end of the last round: clusters are
    # built once, and the rounds can interleave. The ExitStack stops them all, in reverse,
    # also on failure or interrupt.
    with contextlib.ExitStack() as stack:
        if any(n in plain_names for n, _, _ in items):
            progress("bringing up the cluster of the plain scenarios")
            stack.enter_context(plain.shared_cluster(workdir))
        lives = start_scenarios(items, st, workdir, stack, runs)
        records = RoundRecords(runs)
        if lives:
            run_rounds(st, lives, records)
        for i, live in enumerate(lives):
            one_off_phases(live, st, f"({i + 1}/{len(lives)}) {live.name} {live.placement}", lives)
        churn_rounds(st, lives, records)
    return runs, skipped


# --- the earlier benchmarks ---------------------------------------------------------------------

EARLIER = {
    "rbac_check": ["--policies", "2000", "--calls", "5000", "--build-repeats", "1"],
    "state_load": ["--sizes", "1000,10000", "--format", "json", "--repeats", "1", "--rounds", "3"],
}


def run_earlier() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, args in EARLIER.items():
        progress(f"earlier benchmark {name} (quick settings)")
        try:
            done = subprocess.run(
                [sys.executable, str(HERE / f"{name}.py"), *args],
                capture_output=True, timeout=300, cwd=HERE.parent, check=False,
            )  # fmt: skip
            lines = done.stdout.decode(errors="replace").strip().splitlines()
            if done.returncode != 0 or not lines:
                raise BenchError(f"exit {done.returncode}: {done.stderr.decode()[-300:]}")
            out[name] = json.loads(lines[-1])
        except (BenchError, ValueError, subprocess.TimeoutExpired) as e:
            out[name] = {"error": str(e)}
    return out


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[Settings, Path | None]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 6 minutes: 1000 rps only, 2 rounds")
    ap.add_argument("--rates", help="comma-separated request rates (rps)")
    ap.add_argument("--seconds", type=float, help="seconds per HTTP rate phase")
    ap.add_argument("--conns", type=int, help="keep-alive connections for the HTTP load")
    ap.add_argument("--bulk-seconds", type=float)
    ap.add_argument("--connect-seconds", type=float)
    ap.add_argument("--handshake-seconds", type=float, help="seconds of new mTLS handshakes")
    ap.add_argument("--idle-conns", type=int, help="idle connections for memory per connection")
    ap.add_argument("--rounds", type=int, help="latency rounds (quick 2, full 3)")
    ap.add_argument(
        "--pin",
        choices=rounds.PIN_LAYOUTS,
        help="CPU layout: off (default) or split (load generator on the first CPU, server "
        "app on the second, proxies on all)",
    )
    ap.add_argument("--connect-workers", type=int, help="new connections in flight (16)")
    ap.add_argument("--connect-procs", type=int, help="processes making them (2)")
    ap.add_argument("--placements", help="comma-separated: cross-node,same-node")
    ap.add_argument("--scenarios", help="comma-separated scenario names (default: all)")
    ap.add_argument("--no-earlier", action="store_true", help="skip rbac_check and state_load")
    ap.add_argument(
        "--cluster-name",
        default=plain.CLUSTER_NAME,
        help="name of the plain scenarios' cluster (its namespaces are named after it)",
    )
    ap.add_argument("--out", type=Path, help="output directory (default results/<timestamp>)")
    a = ap.parse_args(argv)
    st = QUICK if a.quick else FULL
    changes: dict[str, Any] = {}
    if a.rates:
        changes["rates"] = tuple(int(r) for r in a.rates.split(","))
    fields = (
        "conns", "bulk_seconds", "connect_seconds", "connect_workers", "connect_procs",
        "handshake_seconds", "idle_conns",
    )  # fmt: skip
    for field in (*fields, "rounds"):
        if getattr(a, field) is not None:
            changes[field] = getattr(a, field)
    if a.seconds is not None:
        changes["http_seconds"] = a.seconds
    if a.placements:
        changes["placements"] = tuple(a.placements.split(","))
    if a.scenarios:
        changes["scenarios"] = tuple(a.scenarios.split(","))
    if a.no_earlier:
        changes["earlier"] = False
    if a.pin:
        changes["pin"] = a.pin
    st = replace(st, **changes)
    try:
        plain.set_cluster_name(a.cluster_name)
    except ValueError as e:
        ap.error(f"--cluster-name: {e}")
    if any(p not in plain.PLACEMENTS for p in st.placements):
        ap.error(f"--placements: each must be one of {', '.join(plain.PLACEMENTS)}")
    if not st.rates or any(not 1 <= r <= 20000 for r in st.rates):
        ap.error("--rates: each must be 1..20000")
    if not 1 <= st.rounds <= 10 or not 1 <= st.conns <= 256 or not 1 <= st.idle_conns <= 50000:
        ap.error("--rounds 1..10, --conns 1..256, --idle-conns 1..50000")
    return st, a.out


def main(argv: list[str] | None = None) -> int:
    st, out = parse_args(argv)
    if os.geteuid() != 0:
        print("mesh_bench: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    started = time.monotonic()
    outdir = out or RESULTS_DIR / time.strftime("%Y%m%d-%H%M%S")
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="meshbench-") as tmp:
        try:
            runs, skipped = run_all(st, Path(tmp))
        except (BenchError, MeshUpError) as e:
            print(f"mesh_bench: {e}", file=sys.stderr)
            return 1
    earlier = run_earlier() if st.earlier else {}
    doc = {
        "benchmark": "mesh_bench",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join([sys.executable, *sys.argv]),
        # Which interpreter ran every process of the run: a build without profile-guided
        # optimisation costs the mesh's Python about an eighth (benchmarks/README.md).
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(),
                 "python": platform.python_version(), "python_prefix": sys.base_prefix},
        "params": {**asdict(st), "client_sysctls": CLIENT_SYSCTLS},
        "runs": runs,
        "skipped": skipped,
        "earlier": earlier,
        "notes": [ROUNDS_NOTE, HBONE_NOTE, CONNECT_NOTE, IDLE_NOTE, WAYPOINT_NOTE],
        "cpu_layout": rounds.describe_plan(
            rounds.pin_plan(st.pin, sorted(os.sched_getaffinity(0)))
        ),
        "elapsed_s": time.monotonic() - started,
    }  # fmt: skip
    (outdir / "results.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    path = report.write_report(doc, outdir)
    progress(f"done in {time.monotonic() - started:.0f} s: {path}")
    for t in report.targets(report.aggregate(runs), runs=runs):
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t.met]
        value = "n/a" if t.value is None else f"{t.value:.3f}"
        print(f"  {t.placement:<10} {t.name:<45} {value:>8} {t.unit:<4} {verdict}")
    return 1 if any(r.get("error") for r in runs) else 0


if __name__ == "__main__":
    # SIGINT/SIGTERM: every scenario's `finally` tears its cluster down; then say what.
    sys.exit(run_interruptible(main, "mesh_bench"))
