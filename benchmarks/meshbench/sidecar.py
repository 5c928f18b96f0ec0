"""The `sidecar` scenario: our own tunnel as a per-pod sidecar pair.

The same code as the ambient scenario, in a different architecture: instead of one tunnel
per node serving every pod of its node, each pod gets its own `python -m ztunnel` process,
started inside that pod's network namespace (as a sidecar container shares its pod's),
enrolled through an enrolment file that names only its pod. Capture is the in-pod
iptables capture ambient uses, so the app's connections reach its own sidecar, which
carries them over HBONE (mTLS, HTTP/2 CONNECT) to the peer pod's sidecar on 15008.

No node agent runs: the sidecar's enrolment is fixed for its life, as a sidecar's is.
Each sidecar's readiness, admin and metrics ports listen in its own pod, so two sidecars
on one node (same-node placement) never collide. Everything is recorded in the cluster's
state, so `mesh.down` stops the sidecars with the rest.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import yaml

from localcluster import mesh
from localcluster.processes import spawn_in_netns
from localcluster.xds import workload_uid
from meshcore.defaults import ADMIN_PORT, HBONE_PORT, METRICS_PORT, READINESS_PORT, TUNNEL_MARK
from meshcore.identity.spiffe import SpiffeId
from redirect import capture
from ztunnel import config as ztcfg

from . import sidecar_cluster as sc
from .handshake import mint_from_ca, private_dir
from .scenario import HBONE, Endpoint, HandshakeTarget, Running

READY_TIMEOUT = 30.0
# The tunnel's own defaults; they are per pod here, as a sidecar's are.


class SidecarUpError(RuntimeError):
    """A sidecar did not become ready; the message names it and its log."""


def sidecar_name(pod: str) -> str:
    return f"sidecar-{pod}"


class SidecarScenario:
    """Per-pod tunnels, HBONE mTLS between the client's and the server's."""

    name = "sidecar"

    def __init__(self, placement: str = "cross-node", cluster_name: str = "") -> None:
        self.placement = sc.check_placement(placement)
        self.cluster_name = cluster_name or ("scx" if placement == "cross-node" else "scs")
        self._state_root: Path | None = None
        self._cluster_file: Path | None = None
        self._tls_dir: Path | None = None
        self.cluster: mesh.Cluster | None = None

    def start(self, workdir: Path) -> Running:
        self._state_root = workdir / f"state-{self.cluster_name}"  # shared workdirs are fine
        cluster_file = sc.write_cluster_file(workdir, self.cluster_name, self.placement, True)
        self._cluster_file = cluster_file
        try:
            cluster = mesh.up(cluster_file, self._state_root, mesh=False)
            self.cluster = cluster
            cluster.paths.root.mkdir(parents=True, exist_ok=True)
            mesh.write_mesh_config(cluster.spec, cluster.paths)
            mesh.start_control_plane(cluster.spec, cluster.layout, cluster.state)
            pids = {
                "client-sidecar": [self._start_sidecar(cluster, sc.CLIENT_POD)],
                "server-sidecar": [self._start_sidecar(cluster, sc.SERVER_POD)],
            }
            for pod in (sc.CLIENT_POD, sc.SERVER_POD):
                self._wait_ready(cluster, pod)
            client_netns = sc.pod_netns(cluster, sc.CLIENT_POD)
            server_ip = sc.pod_ip(cluster, sc.SERVER_POD)
            handshake = self._handshake(cluster, workdir, client_netns, server_ip)
        except BaseException:
            self.stop()
            raise
        return Running(
            http=Endpoint(client_netns, server_ip, sc.HTTP_PORT),
            bulk=Endpoint(client_netns, server_ip, sc.BULK_PORT),
            proxies=pids,
            # The client's sidecar is our tunnel too: its admin port, in the client pod.
            tunnel_admin=(client_netns, f"127.0.0.1:{ADMIN_PORT}"),
            handshake=handshake,
            server=sc.server_pids(cluster),
        )

    def _handshake(
        self, cluster: mesh.Cluster, workdir: Path, client_netns: str, server_ip: str
    ) -> HandshakeTarget:
        """The server pod's sidecar on its 15008, with the client pod's identity from the
        cluster's CA (as the client's sidecar gets it, with its node's token)."""
        td = cluster.spec.trust_domain
        self._tls_dir = private_dir(workdir, f"hs-{self.cluster_name}-")
        client_node = cluster.spec.pod(sc.NAMESPACE, sc.CLIENT_POD).node
        tls = mint_from_ca(
            cluster.paths.ca_socket,
            cluster.paths.token(client_node),
            SpiffeId(td, sc.NAMESPACE, "client"),
            self._tls_dir,
        )
        return HandshakeTarget(
            netns=client_netns,
            host=server_ip,
            port=HBONE_PORT,
            protocol=HBONE,
            app_port=sc.HTTP_PORT,
            server_identity=str(SpiffeId(td, sc.NAMESPACE, "server")),
            tls=tls,
            mark=TUNNEL_MARK,
            server_roles=("server-sidecar",),
            origin=(
                f"client pod netns (SO_MARK {TUNNEL_MARK:#x}, as the client sidecar's own "
                f"sockets) -> the server pod's sidecar on its {HBONE_PORT}"
            ),
        )

    def _start_sidecar(self, cluster: mesh.Cluster, pod: str) -> int:
        spec = cluster.spec
        netns = sc.pod_netns(cluster, pod)
        node = spec.pod(sc.NAMESPACE, pod).node
        paths = cluster.paths
        enrolment = paths.root / f"enrolment-{pod}.yaml"
        uid = workload_uid(spec, spec.pod(sc.NAMESPACE, pod))
        enrolment.write_text(yaml.safe_dump({"pods": [{"uid": uid, "netns": netns}]}))
        capture.install(netns, capture.RedirectMode.IPTABLES)
        env = sc.base_env()
        env.update(
            {
                ztcfg.NODE_NAME: node,
                ztcfg.LOCAL_XDS_PATH: str(paths.xds),
                ztcfg.ENROLMENT_PATH: str(enrolment),
                # The node's CA token: the CA issues a pod's identity to its node's holder.
                ztcfg.CA_ADDRESS: str(paths.ca_socket),
                ztcfg.CA_TOKEN_PATH: str(paths.token(node)),
                ztcfg.TRUST_DOMAIN: spec.trust_domain,
                ztcfg.READINESS_PORT: str(READINESS_PORT),
                ztcfg.ADMIN_PORT: str(ADMIN_PORT),
                ztcfg.METRICS_PORT: str(METRICS_PORT),
                # A benchmark stop need not wait for connections to finish.
                ztcfg.DRAIN_SECONDS: "0",
            }
        )
        name = sidecar_name(pod)
        proc = spawn_in_netns(
            netns,
            [sys.executable, "-m", "ztunnel"],
            env,
            Path.cwd(),
            cluster.state.log_dir / f"{name}.log",
            cluster.state.pidfile_dir,
            name,
        )
        return proc.pid

    def _wait_ready(self, cluster: mesh.Cluster, pod: str) -> None:
        netns = sc.pod_netns(cluster, pod)
        uid = workload_uid(cluster.spec, cluster.spec.pod(sc.NAMESPACE, pod))
        deadline = time.monotonic() + READY_TIMEOUT
        status = None
        while time.monotonic() < deadline:
            status = sc.http_get_json(netns, READINESS_PORT, "/healthz/ready")
            if isinstance(status, dict) and status.get("ready"):
                held = status.get("pods")
                if isinstance(held, dict) and set(held) == {uid}:
                    return
            time.sleep(0.1)
        log = cluster.state.log_dir / f"{sidecar_name(pod)}.log"
        raise SidecarUpError(
            f"sidecar of {pod} not ready after {READY_TIMEOUT:.0f} s (last status {status}); "
            f"see {log}"
        )

    def sidecar_log(self, pod: str) -> Path:
        if self.cluster is None:
            raise RuntimeError("the scenario is not running")
        return self.cluster.state.log_dir / f"{sidecar_name(pod)}.log"

    def stop(self) -> None:
        if self._state_root is not None:
            mesh.down(self.cluster_name, self._state_root)
            # `down` keeps the CA's root (ca/) for a later `up`; a benchmark run starts anew.
            shutil.rmtree(self._state_root, ignore_errors=True)
        if self._cluster_file is not None:
            self._cluster_file.unlink(missing_ok=True)
        if self._tls_dir is not None:
            shutil.rmtree(self._tls_dir, ignore_errors=True)
            self._tls_dir = None
        self.cluster = None
