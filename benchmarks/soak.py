"""Soak and churn benchmark: N connections held through the mesh for a long run plus a paced
stream of new connections, with the tunnels' memory, descriptors and CPU sampled over time.

One cluster (meshbench/bench.yaml, named --cluster-name), the `ambient` cross-node path:
the load generator (soakbench/gen.py) runs in the client pod's netns on node1 and talks to
the server pod on node2 through both node tunnels (HBONE mTLS). It holds --held
connections (each making a small round trip every --held-period s) and opens --rate new
connections a second (connect, one request and answer, close) for --duration s. Every
--interval s, on each of the generator's interval lines, this harness reads each tunnel's
VmRSS, open descriptors and CPU from /proc, and the generator's own CPU.

Writes benchmarks/results/soak-<timestamp>/ (or --out): results.json (raw, with the
per-interval latency histograms), summary.json (the same without histograms), report.md
(targets met / not met: RSS and fd counts flat after the warm-up within their noise band,
zero errors, every held connection alive, the rate achieved) and PNG plots over time.
Needs root; run it under the machine lock. Interrupted (SIGINT, SIGTERM), it tears the
cluster down and exits 130 / 143. Exit 1 when a target is not met or the run failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import selectors
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from meshbench import costs, plain
from meshbench.scenario import Running
from soakbench import report, tcpstats

import nsutil
from localcluster.apps import INHERITED_ENV
from localcluster.interrupt import run_interruptible
from localcluster.mesh import MeshUpError, netns_http
from meshcore.defaults import ADMIN_PORT

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
PLACEMENT = "cross-node"  # the case that matters: both tunnels on the path
CLUSTER_NAME = "soak"
LINE_GRACE = 60.0  # seconds beyond its own bound a generator line may take
# After the held connections closed: the last sample waits until no tunnel's descriptor count
# changed for CLOSE_STEADY s (10 000 closes take a busy tunnel seconds), at most CLOSE_MAX s.
CLOSE_STEADY = 2.0
CLOSE_MAX = 30.0


@dataclass(frozen=True, slots=True)
class Settings:
    mode: str
    held: int
    rate: float
    duration: float
    interval: float
    warmup: float
    held_period: float
    max_in_flight: int
    placement: str = PLACEMENT


# At most 500 new connections open at once: past the mesh's rate an open loop only queues
# (with 1 000, a 60 s trial at 1000/s saw p50 0.6 s, p99 6 s and answers past 10 s).
FULL = Settings("full", 10_000, 1000.0, 600.0, 5.0, 60.0, 30.0, 500)
QUICK = Settings("quick", 2_000, 200.0, 60.0, 2.0, 15.0, 15.0, 500)


class SoakError(RuntimeError):
    """The run could not go on; the message says what to check."""


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- /proc ------------------------------------------------------------------------------------


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def nofile_limit(pid: int) -> str | None:
    """The soft and hard open-file limits of a running process, as /proc shows them."""
    try:
        with open(f"/proc/{pid}/limits", encoding="ascii") as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft, hard = line.split()[3:5]
                    return soft if soft == hard else f"{soft} (hard {hard})"
    except OSError:
        return None
    return None


def host_cpu_s() -> float | None:
    """CPU seconds the whole machine has spent busy (not idle or iowait), from /proc/stat:
    with the tunnels' and the generator's own, it shows how much the rest of the machine
    took meanwhile (others' work shares these cores)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / costs.CLK_TCK


def memory(proxies: dict[str, list[int]]) -> dict[str, dict[str, Any] | None]:
    """Per role: the tunnel's own account of its memory (admin `/memory`, read inside its
    netns: Python's blocks and arenas, glibc's heap in use and free), which says whether a
    rise in RSS is objects or memory the allocators keep. The owner process's (workers keep
    their own heaps); None when it does not answer."""
    out: dict[str, dict[str, Any] | None] = {}
    for role, pids in proxies.items():
        try:
            status, body = netns_http(f"/proc/{pids[0]}/ns/net", ADMIN_PORT, "/memory", timeout=2.0)
            doc = json.loads(body) if status == 200 else None
        except (OSError, ValueError, IndexError):
            doc = None
        out[role] = doc if isinstance(doc, dict) else None
    return out


def sample(proxies: dict[str, list[int]]) -> dict[str, dict[str, Any] | None]:
    """Per role: RSS (kB), open descriptors and CPU seconds; None when a process is gone."""
    out: dict[str, dict[str, Any] | None] = {}
    usage = costs.sample(proxies)
    for role, pids in proxies.items():
        u = usage.get(role)
        fds = [fd_count(p) for p in pids]
        if u is None or any(f is None for f in fds):
            out[role] = None
            continue
        out[role] = {"rss_kb": u.rss_kb, "fds": sum(f for f in fds if f), "cpu_s": u.cpu_s}
    return out


# --- the generator ----------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))
    return env


def gen_argv(st: Settings, host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "soakbench.gen", "--host", host, "--port", str(port),
        "--held", str(st.held), "--held-period", str(st.held_period),
        "--rate", str(st.rate), "--max-in-flight", str(st.max_in_flight),
        "--duration", str(st.duration), "--interval", str(st.interval),
    ]  # fmt: skip


class Lines:
    """The generator's JSON lines, each awaited with a bound. Read with os.read into our own
    buffer: a buffered file would take several lines in one read and leave the selector
    waiting on an empty pipe."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buf = bytearray()
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.fd, selectors.EVENT_READ)

    def next(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (end := self.buf.find(b"\n")) < 0:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sel.select(timeout=left):
                raise SoakError(f"the load generator said nothing for {timeout:.0f} s")
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                raise SoakError(f"the load generator ended early: {self._stderr()}")
            self.buf += chunk
        line = bytes(self.buf[:end])
        del self.buf[: end + 1]
        doc = json.loads(line)
        if not isinstance(doc, dict) or "phase" not in doc:
            raise SoakError(f"the load generator printed {line[:200]!r}")
        return doc

    def _stderr(self) -> str:
        if self.proc.stderr is None:
            return ""
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.proc.wait(timeout=5.0)
            return self.proc.stderr.read()[-1500:].decode(errors="replace")
        return ""


def drive(st: Settings, running: Running, doc: dict[str, Any]) -> None:
    """Run the generator in the client pod; fill `doc` as its lines arrive (so a failure
    part way still leaves what was measured)."""
    proxies = running.proxies
    ep = running.http
    doc["limits"] = {role: nofile_limit(pids[0]) for role, pids in proxies.items()}
    doc["idle"] = sample(proxies)
    proc = subprocess.Popen(
        gen_argv(st, ep.host, ep.port),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        cwd=HERE,
        preexec_fn=nsutil.preexec_enter(ep.netns),
    )
    try:
        _drive(st, proc, proxies, doc, running.server)
    finally:
        if proc.poll() is None:
            proc.kill()  # by its own handle: the process this run started
        proc.wait()
        if proc.stderr is not None:
            err = proc.stderr.read().decode(errors="replace").strip()
            if err:
                doc.setdefault("notes", []).append(f"load generator stderr: {err[-600:]}")


def _drive(
    st: Settings, proc: subprocess.Popen[bytes], proxies: dict[str, list[int]],
    doc: dict[str, Any], server: list[int],
) -> None:  # fmt: skip
    lines = Lines(proc)
    doc["limits"]["load generator"] = nofile_limit(proc.pid)
    progress(f"opening {st.held} held connections")
    held = lines.next(30.0 + st.held / 100.0 + LINE_GRACE)
    if held["phase"] != "held":
        raise SoakError(f"expected the held phase first, got {held['phase']}")
    doc["held_phase"] = held
    doc["after_held"] = sample(proxies)
    doc["after_held_host_cpu_s"] = host_cpu_s()
    progress(f"held: {held['opened']} of {held['requested']} open in {held['seconds']:.1f} s"
             + (f"; failed: {held['errors']}" if held["errors"] else ""))  # fmt: skip
    progress(f"churn: {st.rate:g}/s for {st.duration:g} s, a sample every {st.interval:g} s")
    timeline: list[dict[str, Any]] = doc["timeline"]
    gen_pid = {"gen": [proc.pid]}
    # The kernel's TCP counters of each namespace on the path, over the churn.
    where = {"client pod (generator, client tunnel's listener)": proc.pid}
    if server:
        where["server pod (server tunnel's connects, the app)"] = server[0]
    where.update({f"{role} (node)": pids[0] for role, pids in proxies.items() if pids})
    tcp0 = {label: tcpstats.read(pid) for label, pid in where.items()}
    soft0 = tcpstats.read_softnet_dropped()
    while True:
        line = lines.next(st.interval + 2 * 10.0 + LINE_GRACE)
        if line["phase"] == "end":
            doc["end"] = line
            break
        if line["phase"] != "interval":
            raise SoakError(f"unexpected generator line {line['phase']}")
        gen = costs.sample(gen_pid)["gen"]
        line["gen_cpu_s"] = gen.cpu_s if gen is not None else None
        line["proxies"] = sample(proxies)
        line["memory"] = memory(proxies)
        line["host_cpu_s"] = host_cpu_s()
        timeline.append(line)
        _say(line, proxies)
    doc["at_end"] = sample(proxies)
    soft1 = tcpstats.read_softnet_dropped()
    doc["tcp_counters"] = {
        "churn": {label: tcpstats.delta(tcp0[label], tcpstats.read(pid))
                  for label, pid in where.items()},
        "softnet_dropped": None if soft0 is None or soft1 is None else soft1 - soft0,
    }  # fmt: skip
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.write(b"\n")
        proc.stdin.flush()
    closed = lines.next(30.0)
    if closed["phase"] != "closed":
        raise SoakError(f"expected the close, got {closed['phase']}")
    doc["after_close"], doc["close_settle_s"] = settle(proxies)
    proc.wait(timeout=30.0)


def settle(proxies: dict[str, list[int]]) -> tuple[dict[str, dict[str, Any] | None], float]:
    """Sample until the descriptor counts stop changing (bounded); returns the last sample
    and the seconds it took."""
    t0 = time.monotonic()
    last = sample(proxies)
    steady_since = time.monotonic()
    while time.monotonic() - t0 < CLOSE_MAX:
        time.sleep(0.5)
        now = sample(proxies)
        if _fds(now) != _fds(last):
            steady_since = time.monotonic()
        elif time.monotonic() - steady_since >= CLOSE_STEADY:
            return now, time.monotonic() - t0
        last = now
    return last, time.monotonic() - t0


def _fds(s: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    return {role: (v or {}).get("fds") for role, v in s.items()}


def _say(line: dict[str, Any], proxies: dict[str, list[int]]) -> None:
    new, held = line["new"], line["held"]
    errs = sum(new["errors"].values()) + sum(held["errors"].values())
    tunnels = "  ".join(
        f"{r} {s['rss_kb'] / 1024:.1f} MB {s['fds']} fds" if s else f"{r} GONE"
        for r, s in line["proxies"].items()
    )
    progress(
        f"t={line['t']:.0f}s new ok {new['ok']} missed {new['missed_cap'] + new['missed_late']} "
        f"errors {errs} alive {line['alive']}  {tunnels}"
    )


# --- main -------------------------------------------------------------------------------------


def limit_notes(st: Settings) -> list[str]:
    """What this machine's open-file limit allows, said up front (never worked around by
    holding fewer connections than asked)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Cross-node, each held connection is one descriptor in the generator, in the client
    # tunnel (accepted on 15001), in the server tunnel (to the app) and in the app; the
    # tunnels add their HBONE connections (100 streams each) and the churn in flight.
    need = st.held + st.max_in_flight + st.held // 100 + 256
    notes = [
        f"open-file limit here: soft {soft}, hard {hard}; the tunnels and the generator inherit "
        f"it (the cluster code does not raise it); each needs about {need} for these settings"
    ]
    if hard < need:
        notes.append(
            f"LIMIT: the hard open-file limit {hard} is below the ~{need} descriptors one "
            "process needs here: connections past it fail to open and are reported as errors"
        )
    return notes


def parse_args(argv: list[str] | None = None) -> tuple[Settings, Path | None, str, Path | None]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="2 000 held, 200/s for 60 s (development, smoke)")  # fmt: skip
    ap.add_argument("--held", type=int, help="connections held open (full: 10 000)")
    ap.add_argument("--rate", type=float, help="new connections per second (full: 1 000)")
    ap.add_argument("--duration", type=float, help="seconds of churn (full: 600)")
    ap.add_argument("--interval", type=float, help="seconds between samples (full: 5)")
    ap.add_argument("--warmup", type=float, help="seconds left out of the trends (full: 60)")
    ap.add_argument("--held-period", type=float, help="seconds between a held one's round trips")
    ap.add_argument("--max-in-flight", type=int, help="new connections open at once, at most")
    ap.add_argument("--cluster-name", default=CLUSTER_NAME)
    ap.add_argument("--out", type=Path, help="output directory (default results/soak-<time>)")
    ap.add_argument(
        "--render", type=Path, metavar="DIR",
        help="only write report.md, summary.json and the plots again from DIR/results.json",
    )  # fmt: skip
    a = ap.parse_args(argv)
    st = QUICK if a.quick else FULL
    fields = ("held", "rate", "duration", "interval", "warmup", "held_period", "max_in_flight")
    st = replace(st, **{f: getattr(a, f) for f in fields if getattr(a, f) is not None})
    if not 0 <= st.held <= 50_000 or not 0 <= st.rate <= 5_000:
        ap.error("--held 0..50000, --rate 0..5000")
    if not 0 < st.duration <= 7200 or not 0.2 <= st.interval <= 60:
        ap.error("--duration 0..7200 s, --interval 0.2..60 s")
    if not 0 <= st.warmup < st.duration:
        ap.error("--warmup must be below --duration")
    if st.held_period < 10.0 or st.max_in_flight < 1:
        ap.error("--held-period >= 10 s, --max-in-flight >= 1")
    return st, a.out, a.cluster_name, a.render


def write_outputs(doc: dict[str, Any], outdir: Path) -> int:
    """report.md, summary.json and the plots of a run; prints the targets. Returns the
    exit code: 1 when the run failed or a target is not met."""
    path, summary = report.write_report(doc, outdir)
    small = report.summary_json(doc, summary)
    (outdir / "summary.json").write_text(json.dumps(small, indent=1) + "\n", encoding="utf-8")
    progress(f"report: {path}")
    for t in summary["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t.met]
        print(f"  {t.name:<40} {verdict:<13} {t.measured}")
    return 1 if doc.get("error") or any(t.met is False for t in summary["targets"]) else 0


def render_again(where: Path) -> int:
    try:
        doc = json.loads((where / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"soak: --render: cannot read {where / 'results.json'}: {e}", file=sys.stderr)
        return 2
    if not isinstance(doc, dict) or doc.get("benchmark") != "soak" or "held_phase" not in doc:
        print(f"soak: --render: {where / 'results.json'} is not a soak run's", file=sys.stderr)
        return 2
    return write_outputs(doc, where)


def main(argv: list[str] | None = None) -> int:
    st, out, name, again = parse_args(argv)
    if again is not None:
        return render_again(again)
    if os.geteuid() != 0:
        print("soak: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    try:
        plain.set_cluster_name(name)
    except ValueError as e:
        print(f"soak: --cluster-name: {e}", file=sys.stderr)
        return 2
    started = time.monotonic()
    outdir = out or RESULTS_DIR / time.strftime("soak-%Y%m%d-%H%M%S")
    outdir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "benchmark": "soak",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(),
                 "python": platform.python_version()},
        "params": asdict(st),
        "notes": limit_notes(st),
        "timeline": [],
    }  # fmt: skip
    for n in doc["notes"]:
        progress(n)
    failed: str | None = None
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        scn = plain.Ambient(PLACEMENT)
        try:
            progress(f"bringing up cluster {name}")
            running = scn.start(Path(tmp))
            try:
                drive(st, running, doc)
            finally:
                progress("stopping the cluster")
                scn.stop()
        except (SoakError, MeshUpError, OSError, ValueError) as e:
            failed = f"{type(e).__name__}: {e}"
            doc["error"] = failed
            progress(f"FAILED: {failed}")
    doc["elapsed_s"] = time.monotonic() - started
    (outdir / "results.json").write_text(json.dumps(doc) + "\n", encoding="utf-8")
    if "held_phase" not in doc:
        return 1
    progress(f"done in {doc['elapsed_s']:.0f} s")
    return write_outputs(doc, outdir)


if __name__ == "__main__":
    sys.exit(run_interruptible(main, "soak"))
