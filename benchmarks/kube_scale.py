"""The control plane at scale, against the real API server (no network namespaces needed).

A real kube-apiserver (v1.20.2, `localcluster.kube.apiserver`) is filled with N pods bound to
Node objects and given a kubelet's status, S services and P AuthorizationPolicies
(`benchmarks/kubescale/populate.py`). Then `python -m controlplane --grpc-listen` starts, and:

- initial sync: from the control plane's start to its first push holding every pod, and to
  every connected xDS client holding that state;
- push latency: a namespace label is flipped (`istio.io/dataplane-mode` ambient <-> off, each
  flip changing every workload of that namespace); per flip, the time from the API write to
  the LAST of the connected tunnel processes (`python -m ztunnel`, XDS_ADDRESS, no pods
  enrolled) logging that it applied the new state; p50/p99/max over the flips (target: p99
  < 1 s). An in-process xDS client checks that the change is the one expected;
- memory: the control plane's RSS once synced and after the flips, and the RSS of one tunnel
  process holding that state.

All of it shares the machine's cores: API server, control plane, tunnels and this process.
Every loop is bounded by a count or a deadline; everything started is stopped.

    .venv/bin/python benchmarks/kube_scale.py            # 10 000 pods, 1 000 services/policies
    .venv/bin/python benchmarks/kube_scale.py --quick    # 1 000 / 100 / 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kubescale.populate import Scale, populate  # noqa: E402

from controlplane.ca import CertificateAuthority  # noqa: E402
from controlplane.install import install_crds  # noqa: E402
from controlplane.xds.tls import server_identity  # noqa: E402
from kube import kinds  # noqa: E402
from kube.client import KubeClient, load_kubeconfig  # noqa: E402
from localcluster.kube.apiserver import KubeControlPlane  # noqa: E402
from meshcore.defaults import TRUST_DOMAIN  # noqa: E402
from meshcore.observability import logging as meshlog  # noqa: E402
from meshcore.state import MeshState, TunnelProtocol  # noqa: E402
from meshcore.xds import messages as m  # noqa: E402
from meshcore.xds.client import XdsClient, XdsTarget  # noqa: E402
from meshcore.xds.convert import RESOURCE_TYPES  # noqa: E402
from meshcore.xds.credentials import token_credentials  # noqa: E402
from meshcore.xds.grpc import client_context  # noqa: E402

LABEL = "istio.io/dataplane-mode"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class LogTail:
    """The control plane's JSON log lines, read by a thread; `pushes` are its 'mesh pushed'."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.pushes: list[tuple[float, dict[str, Any]]] = []
        self.lines: list[str] = []
        assert proc.stdout is not None
        self._t = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._t.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)
            if len(self.lines) > 2000:
                del self.lines[:1000]
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and ev.get("event") == "mesh pushed":
                self.pushes.append((time.monotonic(), ev))


class AppliedTail:
    """When a tunnel process logged each applied state (its JSON log line, read by a thread
    as it is written)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.times: list[float] = []
        assert proc.stdout is not None
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            if '"xds_config_applied"' in line:
                self.times.append(time.monotonic())


def protocol_of(state: MeshState | None, uid: str) -> TunnelProtocol | None:
    w = state.workload_by_uid(uid) if state is not None else None
    return w.protocol if w is not None else None


async def wait_for(pred: Any, deadline_s: float, what: str, step: float = 0.005) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > deadline_s:
            raise TimeoutError(f"{what}: not within {deadline_s} s")
        await asyncio.sleep(step)
    return time.monotonic()


async def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    scale = Scale(args.pods, args.services, args.policies)
    cp = KubeControlPlane(work / "kube", die_with_parent=True)
    out: dict[str, Any] = {"pods": scale.pods, "services": scale.services}
    out["policies"] = scale.policies
    cp.start()
    procs: list[subprocess.Popen[Any]] = []
    try:
        async with KubeClient(load_kubeconfig(cp.kubeconfig), timeout=60) as c:
            await install_crds(c)
            t0 = time.monotonic()
            failed = await populate(c, scale)
            out["populate_s"] = round(time.monotonic() - t0, 1)
            if any(failed.values()):
                raise RuntimeError(f"could not fill the API server: {failed}")

            state_dir = work / "state"
            state_dir.mkdir()
            token = secrets.token_hex(32)
            token_path, tokens_file = work / "token", work / "tokens.yaml"
            token_path.write_text(token)
            tokens_file.write_text(f"{token}: bench\n")
            port = free_port()
            started = time.monotonic()
            cpproc = subprocess.Popen(  # noqa: ASYNC220 (once, before any timing)
                [
                    sys.executable,
                    "-m",
                    "controlplane",
                    "--kubeconfig",
                    str(cp.kubeconfig),
                    "--mesh-out",
                    str(work / "mesh.json"),
                    "--no-waypoints",
                    "--no-status",
                    "--state-dir",
                    str(state_dir),
                    "--grpc-listen",
                    f"127.0.0.1:{port}",
                    # The clients and tunnels below authenticate with one node token.
                    "--xds-node-tokens-file",
                    str(tokens_file),
                ],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            procs.append(cpproc)
            tail = LogTail(cpproc)
            full = lambda: any(ev.get("workloads", 0) >= scale.pods for _, ev in tail.pushes)  # noqa: E731
            await wait_for(full, 300, "the control plane's first full push", 0.05)
            out["sync_first_push_s"] = round(tail.pushes[-1][0] - started, 2)
            out["controlplane_rss_synced_mb"] = round(rss_kb(cpproc.pid) / 1024, 1)

            roots = CertificateAuthority.load_or_create(state_dir, TRUST_DOMAIN).roots_pem()
            target = XdsTarget.parse(
                f"127.0.0.1:{port}", client_context(roots), server_identity(TRUST_DOMAIN)
            )
            clients = [
                XdsClient(
                    target,
                    m.Node(id=f"bench-{i}"),
                    lambda _s: None,
                    RESOURCE_TYPES,
                    credentials=token_credentials(token_path),
                )
                for i in range(args.clients)
            ]
            t_clients = time.monotonic()
            await asyncio.gather(*(cl.start(wait=300) for cl in clients))
            probe_uid = "Kubernetes//Pod/bench-0/pod-0"
            await wait_for(
                lambda: all(protocol_of(cl.current, probe_uid) for cl in clients),
                300,
                "clients' first state",
            )
            out["clients_first_state_s"] = round(time.monotonic() - t_clients, 2)

            # Real tunnel processes on the same server: push latency is timed to the last of
            # them applying the change (their `xds_config_applied` log line), and the first
            # one's memory is reported.
            tunnels: list[subprocess.Popen[str]] = []
            applied: list[list[float]] = []
            for n in range(args.tunnels):
                tun_dir = work / f"tunnel{n}"
                tun_dir.mkdir()
                (tun_dir / "root.pem").write_bytes(roots)
                (tun_dir / "token").write_text(token)
                (tun_dir / "enrolment.yaml").write_text("{}\n")
                admin = free_port()
                tunnel = subprocess.Popen(  # noqa: ASYNC220 (once, outside the timings)
                    [sys.executable, "-m", "ztunnel"],
                    cwd=REPO,
                    env={
                        **os.environ,
                        "NODE_NAME": f"bench-node-{n}",
                        "XDS_ADDRESS": f"127.0.0.1:{port}",
                        "XDS_ROOT_CERT": str(tun_dir / "root.pem"),
                        "ENROLMENT_PATH": str(tun_dir / "enrolment.yaml"),
                        "CA_ADDRESS": str(tun_dir / "ca.sock"),  # never dialled: no pod
                        "CA_TOKEN_PATH": str(tun_dir / "token"),
                        "ADMIN_PORT": str(admin),
                        "METRICS_PORT": str(free_port()),
                        "READINESS_PORT": str(free_port()),
                    },
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                procs.append(tunnel)
                tunnels.append(tunnel)
                applied.append(AppliedTail(tunnel).times)
            await wait_for(lambda: all(applied), 300, "every tunnel's first state", 0.05)
            await asyncio.sleep(1)

            # Push latency: flip one namespace's enrolment at a time.
            lat: list[float] = []
            for k in range(args.flips):
                ns = scale.namespace(k % scale.namespaces)
                # pod-i is in namespace(i % services) (see populate): the first pod there.
                i = next(i for i in range(scale.pods) if scale.namespace(i % scale.services) == ns)
                uid = f"Kubernetes//Pod/{ns}/pod-{i}"
                current = protocol_of(clients[0].current, uid)
                enrol = current != TunnelProtocol.HBONE
                want = TunnelProtocol.HBONE if enrol else TunnelProtocol.NONE
                t0 = time.monotonic()
                await c.patch(
                    kinds.NAMESPACE,
                    ns,
                    {"metadata": {"labels": {LABEL: "ambient" if enrol else None}}},
                )
                await wait_for(
                    lambda u=uid, w=want: all(protocol_of(cl.current, u) == w for cl in clients),
                    30,
                    f"flip {k} at the in-process client",
                )
                await wait_for(
                    lambda t=t0: all(any(x > t for x in times) for times in applied),
                    30,
                    f"flip {k} at every tunnel",
                )
                lat.append(max(min(x for x in times if x > t0) for times in applied) - t0)
                await asyncio.sleep(args.gap)
            lat.sort()
            out["push_ms"] = {
                "n": len(lat),
                "p50": round(statistics.median(lat) * 1000, 1),
                "p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 1),
                "max": round(lat[-1] * 1000, 1),
            }
            out["push_p99_target_met"] = out["push_ms"]["p99"] < 1000
            # The control plane's own part of a flip: compute, parse, write (its log's `ms`).
            rounds = sorted(float(ev.get("ms", 0)) for _, ev in tail.pushes[-len(lat) :])
            out["controlplane_round_ms_p50"] = round(statistics.median(rounds), 1)
            out["controlplane_rss_after_mb"] = round(rss_kb(cpproc.pid) / 1024, 1)

            out["tunnel_rss_mb"] = round(rss_kb(tunnels[0].pid) / 1024, 1)
            for cl in clients:
                await cl.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        cp.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--services", type=int, default=1_000)
    ap.add_argument("--policies", type=int, default=1_000)
    ap.add_argument("--clients", type=int, default=1, help="in-process xDS clients")
    ap.add_argument("--tunnels", type=int, default=3, help="tunnel processes timed")
    ap.add_argument("--flips", type=int, default=30, help="namespace label flips timed")
    ap.add_argument("--gap", type=float, default=0.3, help="seconds between flips")
    ap.add_argument("--quick", action="store_true", help="1 000 pods, 100 services/policies")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args()
    if args.quick:
        args.pods, args.services, args.policies, args.flips = 1000, 100, 100, 10
    if not (0 < args.pods <= 50_000 and 0 < args.services <= args.pods and args.flips <= 500):
        ap.error("--pods 1..50000, --services 1..pods, --flips <= 500")
    # The clients' own log lines (one per applied state) would bury the figures.
    meshlog.configure("warning")
    with tempfile.TemporaryDirectory(prefix="kube-scale-") as d:
        out = asyncio.run(bench(args, Path(d)))
    for k, v in out.items():
        print(f"{k:28} {v}")
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
