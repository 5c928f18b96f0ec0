"""The scenarios built from the cluster alone: `none` (plain namespace, no proxy), `ambient`
(mesh namespace, the node tunnels, HBONE mTLS) and `relay` (plain pods joined by two plain
TCP relays, benchmarks/apps/relay.py: the tunnel's two user-space hops without TLS).

All three use one cluster (bench.yaml: both namespaces, both placements), brought up by
the first scenario that needs it and torn down when the last one stops. The harness holds
it across consecutive plain scenarios with `shared_cluster`, so switching between them
costs nothing and they can be interleaved; the cluster is always down before any other
scenario (which may build its own cluster from the same file) starts.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from l4_datapath import RELAY, BenchError, _env, _wait_listening

from localcluster.apps import process_name
from localcluster.mesh import Cluster, down, process_record, tunnel_name, up
from localcluster.processes import ManagedProcess, spawn_in_netns
from localcluster.spec import valid_cluster_name
from meshcore.defaults import ADMIN_PORT, HBONE_PORT, TUNNEL_MARK
from meshcore.identity.spiffe import SpiffeId

from .handshake import mint_from_ca, private_dir
from .scenario import HBONE, Endpoint, HandshakeTarget, Running

HERE = Path(__file__).resolve().parent
CLUSTER_FILE = HERE / "bench.yaml"
CLUSTER_NAME = "meshbench"
PLAIN_NS = "plain"
MESH_NS = "mesh"
CLIENT_POD = "client-0"
SERVER_POD = {"cross-node": "server-0", "same-node": "server-1"}
SERVER_NODE = {"cross-node": "node2", "same-node": "node1"}
CLIENT_NODE = "node1"
HTTP_PORT = 8080  # as in bench.yaml
SINK_PORT = 5001
PLACEMENTS = ("cross-node", "same-node")


class _Shared:
    """The one cluster of the plain scenarios, reference counted."""

    def __init__(self) -> None:
        self.cluster: Cluster | None = None
        self.state_root: Path | None = None
        self.refs = 0
        self.name = CLUSTER_NAME

    def acquire(self, workdir: Path) -> Cluster:
        if self.cluster is None:
            root = workdir / "plain-cluster"
            root.mkdir(parents=True, exist_ok=True)
            self.state_root = root
            self.cluster = up(cluster_file(root, self.name), root, mesh=True)
        self.refs += 1
        return self.cluster

    def release(self) -> None:
        self.refs = max(0, self.refs - 1)
        if self.refs == 0 and self.cluster is not None:
            cluster, root = self.cluster, self.state_root
            self.cluster = None
            down(cluster.spec.name, root)
            if root is not None:
                shutil.rmtree(root, ignore_errors=True)


_SHARED = _Shared()


def cluster_file(where: Path, name: str) -> Path:
    """bench.yaml, renamed when `name` differs (two runs on one machine must not share
    namespace names). The copy sits beside nothing of bench.yaml's relative paths, so its
    pods' commands are made absolute."""
    if name == CLUSTER_NAME:
        return CLUSTER_FILE
    doc = yaml.safe_load(CLUSTER_FILE.read_text(encoding="utf-8"))
    doc["name"] = name
    for pod in doc["pods"]:
        pod["command"] = [
            str(HERE / part) if part.startswith("apps/") else part for part in pod["command"]
        ]
    path = where / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def set_cluster_name(name: str) -> None:
    """Use another name for the plain scenarios' cluster (before it is up)."""
    if not valid_cluster_name(name):
        raise ValueError(f"cluster name {name!r} is not valid (see localcluster.spec)")
    if _SHARED.cluster is not None:
        raise RuntimeError("the plain scenarios' cluster is already up")
    _SHARED.name = name


@contextmanager
def shared_cluster(workdir: Path) -> Iterator[Cluster]:
    """Keep the plain scenarios' cluster up for the duration (one `up` for all of them)."""
    cluster = _SHARED.acquire(workdir)
    try:
        yield cluster
    finally:
        _SHARED.release()


def _check_placement(placement: str) -> None:
    if placement not in SERVER_POD:
        raise ValueError(f"placement must be one of {sorted(SERVER_POD)}, got {placement!r}")


def _server_pids(cluster: Cluster, namespace: str, placement: str) -> list[int]:
    rec = process_record(cluster, process_name(namespace, SERVER_POD[placement]))
    return [] if rec is None else [rec.pid]


def _endpoints(cluster: Cluster, namespace: str, placement: str) -> tuple[Endpoint, Endpoint]:
    netns = cluster.pod_netns(namespace, CLIENT_POD)
    ip = str(cluster.layout.pod(namespace, SERVER_POD[placement]).ip)
    return Endpoint(netns, ip, HTTP_PORT), Endpoint(netns, ip, SINK_PORT)


class _Base:
    name = ""

    def __init__(self, placement: str) -> None:
        _check_placement(placement)
        self.placement = placement
        self._held = False

    def _acquire(self, workdir: Path) -> Cluster:
        cluster = _SHARED.acquire(workdir)
        self._held = True
        return cluster

    def stop(self) -> None:
        if self._held:
            self._held = False
            _SHARED.release()


class NoMesh(_Base):
    """`none`: the plain namespace's pods, straight over veths and bridges."""

    name = "none"

    def start(self, workdir: Path) -> Running:
        cluster = self._acquire(workdir)
        http, bulk = _endpoints(cluster, PLAIN_NS, self.placement)
        return Running(
            http=http, bulk=bulk, proxies={}, server=_server_pids(cluster, PLAIN_NS, self.placement)
        )


class Ambient(_Base):
    """`ambient`: the mesh namespace's pods, captured by the node tunnels (HBONE mTLS)."""

    name = "ambient"

    def __init__(self, placement: str) -> None:
        super().__init__(placement)
        self._tls_dir: Path | None = None

    def start(self, workdir: Path) -> Running:
        cluster = self._acquire(workdir)
        try:
            return self._start(cluster, workdir)
        except BaseException:
            self.stop()
            raise

    def _start(self, cluster: Cluster, workdir: Path) -> Running:
        http, bulk = _endpoints(cluster, MESH_NS, self.placement)
        # Only the tunnels on the path are the scenario's cost (same-node: just node1's).
        nodes = sorted({CLIENT_NODE, SERVER_NODE[self.placement]})
        proxies: dict[str, list[int]] = {}
        for node in nodes:
            rec = process_record(cluster, tunnel_name(node))
            if rec is None:
                raise BenchError(f"ambient: the tunnel of {node} is not running")
            proxies[f"tunnel-{node}"] = [rec.pid]
        admin = (cluster.layout.node(CLIENT_NODE).netns_path, f"127.0.0.1:{ADMIN_PORT}")
        return Running(
            http=http,
            bulk=bulk,
            proxies=proxies,
            tunnel_admin=admin,
            handshake=self._handshake(cluster, workdir, http),
            server=_server_pids(cluster, MESH_NS, self.placement),
        )

    def _handshake(self, cluster: Cluster, workdir: Path, http: Endpoint) -> HandshakeTarget:
        self._tls_dir = private_dir(workdir, "hs-ambient-")
        return handshake_target(cluster, self._tls_dir, http, self.placement)

    def stop(self) -> None:
        if self._tls_dir is not None:
            shutil.rmtree(self._tls_dir, ignore_errors=True)
            self._tls_dir = None
        super().stop()


def handshake_target(
    cluster: Cluster, tls_dir: Path, http: Endpoint, placement: str
) -> HandshakeTarget:
    """The server node's tunnel on the server pod's 15008, with the client pod's identity
    (from the cluster's CA, as the client node's tunnel gets it; the key and certificate
    are written to `tls_dir`, which the caller removes)."""
    td = cluster.spec.trust_domain
    tls = mint_from_ca(
        cluster.paths.ca_socket,
        cluster.paths.token(CLIENT_NODE),
        SpiffeId(td, MESH_NS, "client"),
        tls_dir,
    )
    server = SERVER_NODE[placement]
    return HandshakeTarget(
        netns=http.netns,
        host=http.host,
        port=HBONE_PORT,
        protocol=HBONE,
        app_port=HTTP_PORT,
        server_identity=str(SpiffeId(td, MESH_NS, "server")),
        tls=tls,
        mark=TUNNEL_MARK,
        server_roles=(f"tunnel-{server}",),
        origin=(
            f"client pod netns (SO_MARK {TUNNEL_MARK:#x}, as the source tunnel's own "
            f"sockets) -> {server}'s tunnel on the server pod's {HBONE_PORT}"
        ),
    )


class Relay(_Base):
    """`relay`: plain pods joined by two plain TCP relays (client node, then server node;
    same-node: both on node1), the same two user-space hops as ambient without TLS."""

    name = "relay"
    # Ports of the first relay (client side) and of the second (server side), per
    # placement: both placements' relays run at once (every scenario stays up for the
    # whole run), and both first relays listen on node1's address.
    PORTS = {
        "cross-node": ({HTTP_PORT: 6080, SINK_PORT: 6001}, {HTTP_PORT: 7080, SINK_PORT: 7001}),
        "same-node": ({HTTP_PORT: 6180, SINK_PORT: 6101}, {HTTP_PORT: 7180, SINK_PORT: 7101}),
    }

    def __init__(self, placement: str) -> None:
        super().__init__(placement)
        self._procs: list[ManagedProcess] = []

    def start(self, workdir: Path) -> Running:
        cluster = self._acquire(workdir)
        try:
            return self._start(cluster)
        except BaseException:
            self.stop()
            raise

    def _start(self, cluster: Cluster) -> Running:
        lay = cluster.layout
        first, second = lay.node(CLIENT_NODE), lay.node(SERVER_NODE[self.placement])
        server_ip = str(lay.pod(PLAIN_NS, SERVER_POD[self.placement]).ip)
        first_ports, second_ports = self.PORTS[self.placement]
        hops = [
            ("relay-b", second.netns_path, str(second.ip), second_ports, server_ip, None),
            ("relay-a", first.netns_path, str(first.ip), first_ports, str(second.ip), second_ports),
        ]
        for name, netns, ip, ports, to_ip, to_ports in hops:
            argv = [sys.executable, str(RELAY), "--bind", ip]
            for app_port, lport in ports.items():
                to_port = to_ports[app_port] if to_ports else app_port
                argv += ["--forward", f"{lport}:{to_ip}:{to_port}"]
            self._procs.append(
                spawn_in_netns(
                    netns,
                    argv,
                    _env(),
                    HERE,
                    cluster.state.log_dir / f"{name}-{self.placement}.log",
                    cluster.state.pidfile_dir,
                    f"{name}-{self.placement}",
                )
            )
            for lport in ports.values():
                _wait_listening(netns, ip, lport)
            if not self._procs[-1].alive():  # the port may be another's: this one is gone
                raise BenchError(f"relay: {name}-{self.placement} exited; see its log")
        netns = cluster.pod_netns(PLAIN_NS, CLIENT_POD)
        entry = str(first.ip)
        return Running(
            http=Endpoint(netns, entry, first_ports[HTTP_PORT]),
            bulk=Endpoint(netns, entry, first_ports[SINK_PORT]),
            proxies={"relay-a": [self._procs[1].pid], "relay-b": [self._procs[0].pid]},
            server=_server_pids(cluster, PLAIN_NS, self.placement),
        )

    def stop(self) -> None:
        procs, self._procs = self._procs, []
        for p in procs:
            p.stop()
        super().stop()


def scenarios(placement: str) -> list[NoMesh | Ambient | Relay]:
    return [NoMesh(placement), Ambient(placement), Relay(placement)]
