"""The `sidecar-haproxy` scenario: HAProxy (Debian's) as an L7 sidecar pair with mTLS,
the reference row of a production C proxy, captured the way Istio's sidecars are.

    client app --HTTP to <server pod IP>:8080-->  (iptables nat OUTPUT REDIRECT)
    127.0.0.1:15080 client-side HAProxy, in the client pod's netns
        --TLS 1.3 with a client certificate, to the original destination-->
    (iptables nat PREROUTING REDIRECT 8080 -> 15443 in the server pod)
    :15443 server-side HAProxy, in the server pod's netns (requires and verifies the
    client certificate against the mesh root) --HTTP--> 127.0.0.1:8080 the app
    bulk: the same in TCP mode, 5001 -> 15081 -> (original destination) -> 15444 -> 5001

The app addresses the server pod as in every other scenario; its sidecar is transparent.
HAProxy 2.6 supports this directly: a REDIRECTed connection's `dst` is its original
destination (SO_ORIGINAL_DST; Debian's build has +NETFILTER), and a server address of
0.0.0.0 means "connect to that destination". The client sidecar's own connections are
told apart from the app's by their owner: HAProxy drops to the `haproxy` user after
binding, and the OUTPUT redirect skips that uid (HAProxy 2.6 can mark only the packets it
sends to clients, not to servers, so a mark cannot do it). The capture is narrowed to the
server pod's two app ports; each pod's rules are one chain of ours, gone with the netns.

HTTP keep-alive on every hop (HAProxy's default in HTTP mode), and the TLS connections
between the pair are pooled (`http-reuse always`), as a mesh's L7 sidecar pools its
upstreams; bulk (TCP mode) is one TLS connection per client connection.

Certificates come from the project's CA code (`controlplane.ca.CertificateAuthority`,
SPIFFE URI SANs), written to a private temp dir together with the configs and the stats
sockets. HAProxy checks the peer's chain against the mesh root on both sides; it has no
check of a URI SAN, so unlike our tunnel it does not pin the peer's identity.

Each HAProxy runs with one thread: the same as one tunnel per pod with one event loop,
and what a sidecar gets on a 2-core machine shared by both pods and the load generator.
"""

from __future__ import annotations

import csv
import io
import pwd
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import nsutil
from controlplane.ca import CertificateAuthority
from localcluster import mesh
from localcluster.processes import spawn_in_netns
from meshcore.identity.certs import new_key_and_csr
from meshcore.identity.spiffe import SpiffeId

from . import sidecar_cluster as sc
from .scenario import HTTP, ClientTls, Endpoint, HandshakeTarget, Running

CLIENT_HTTP_PORT = 15080  # the client sidecar, where the app's HTTP is redirected
CLIENT_BULK_PORT = 15081
SERVER_HTTP_PORT = 15443  # the server sidecar's mTLS listeners, where inbound is redirected
SERVER_BULK_PORT = 15444
USER = "haproxy"  # Debian's package creates it; the capture skips its connections
CHAIN = "MESHBENCH-HAPROXY"
THREADS = 1
# Descriptors kept back from maxconn (see `maxconn_for`).
FD_RESERVE = 2000
IDLE_TIMEOUT = "300s"
READY_TIMEOUT = 15.0
CERT_TTL = timedelta(hours=24)


class HaproxyError(RuntimeError):
    """HAProxy is missing or did not start; the message says what to do or where to look."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca: Path  # the mesh root, to verify the peer
    client: Path  # client sidecar: certificate chain and key in one PEM, as HAProxy wants
    server: Path
    # The load generator's handshakes as the client sidecar: its leaf and key, no root (the
    # generator sends what it loads, as it does to the tunnels).
    generator: Path


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )
    if found is None:
        raise HaproxyError(
            "haproxy is not installed: apt-get install -y haproxy (scripts/setup.sh)"
        )
    return found


def issue(ca: CertificateAuthority, identity: SpiffeId) -> tuple[list[bytes], bytes]:
    """A key and a certificate chain (leaf first, root last) for `identity` from `ca`."""
    key_pem, csr_pem = new_key_and_csr(identity)
    return ca.sign_csr(csr_pem, identity, CERT_TTL), key_pem


def write_tls_files(directory: Path, trust_domain: str, namespace: str) -> TlsFiles:
    ca = CertificateAuthority.create(trust_domain)
    files = TlsFiles(
        directory / "ca.pem",
        directory / "client.pem",
        directory / "server.pem",
        directory / "generator.pem",
    )
    files.ca.write_bytes(ca.roots_pem())
    for path, account in ((files.client, "client"), (files.server, "server")):
        chain, key_pem = issue(ca, SpiffeId(trust_domain, namespace, account))
        path.touch(mode=0o600)
        path.write_bytes(b"".join(chain) + key_pem)  # leaf, root, key
        if account == "client":
            files.generator.touch(mode=0o600)
            files.generator.write_bytes(chain[0] + key_pem)
    return files


def open_file_limit() -> int:
    """The hard RLIMIT_NOFILE HAProxy inherits (it raises its soft limit to it)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def maxconn_for(nofile: int) -> int:
    """maxconn for an open-file limit. HAProxy's own choice is about nofile / 2 (two
    descriptors for every connection, the worst case), which caps the idle-connection phase
    near 10 000 here (limit 20 000, soft = hard, and no CAP_SYS_RESOURCE to raise it, not
    even for root). An idle keep-alive HTTP connection holds one descriptor: its server-side
    connection went back to the pool (`http-reuse always`), and pooled ones are as many as
    requests in flight. So: the limit less a reserve for those, never below HAProxy's own."""
    return max(nofile // 2, nofile - FD_RESERVE)


def _common(stats_socket: Path, maxconn: int | None) -> list[str]:
    return [
        "global",
        f"    nbthread {THREADS}",
        f"    maxconn {maxconn_for(open_file_limit()) if maxconn is None else maxconn}",
        # HAProxy would try to raise the limit to 2 x maxconn and, as it cannot, refuse to
        # start: run within the limit it has (it logs an alert about it at start).
        "    no strict-limits",
        f"    stats socket {stats_socket} mode 600 level user",
        # After binding and loading the certificates: the capture knows us by this uid.
        f"    user {USER}",
        f"    group {USER}",
        "    ssl-default-bind-options ssl-min-ver TLSv1.3",
        "    ssl-default-server-options ssl-min-ver TLSv1.3",
        # The root stays out of the chain sent, as the tunnels leave it out (the peer
        # holds it; each certificate sent costs the peer a parse and a check).
        "    ssl-skip-self-issued-ca",
        "",
        "defaults",
        "    mode http",
        "    option http-keep-alive",
        "    timeout connect 5s",
        f"    timeout client {IDLE_TIMEOUT}",
        f"    timeout server {IDLE_TIMEOUT}",
        f"    timeout http-keep-alive {IDLE_TIMEOUT}",
        "",
    ]


def client_config(tls: TlsFiles, stats_socket: Path, maxconn: int | None = None) -> str:
    """The client pod's sidecar: the app's redirected HTTP (and TCP) in on loopback, mTLS
    out to the original destination (server address 0.0.0.0: same IP and port)."""
    upstream = f"ssl crt {tls.client} ca-file {tls.ca} verify required"
    lines = [
        *_common(stats_socket, maxconn),
        "frontend http_in",
        f"    bind 127.0.0.1:{CLIENT_HTTP_PORT}",
        "    default_backend http_out",
        "",
        "backend http_out",
        # Any idle connection to the peer serves any request, as a mesh's L7 sidecar
        # (Envoy) pools its upstream connections: a new app connection need not cost a
        # new TLS handshake between the pair.
        "    http-reuse always",
        f"    server peer 0.0.0.0 {upstream}",
        "",
        "listen bulk_out",
        "    mode tcp",
        f"    bind 127.0.0.1:{CLIENT_BULK_PORT}",
        f"    server peer 0.0.0.0 {upstream}",
        "",
    ]
    return "\n".join(lines)


def server_config(tls: TlsFiles, stats_socket: Path, maxconn: int | None = None) -> str:
    """The server pod's sidecar: the redirected inbound as mTLS (a client certificate from
    the mesh root is required), plain HTTP (and TCP) to the app on loopback."""
    downstream = f"ssl crt {tls.server} ca-file {tls.ca} verify required"
    lines = [
        *_common(stats_socket, maxconn),
        "frontend http_in",
        f"    bind :{SERVER_HTTP_PORT} {downstream}",
        "    default_backend app",
        "",
        "backend app",
        f"    server app 127.0.0.1:{sc.HTTP_PORT}",
        "",
        "listen bulk_in",
        "    mode tcp",
        f"    bind :{SERVER_BULK_PORT} {downstream}",
        f"    server app 127.0.0.1:{sc.BULK_PORT}",
        "",
    ]
    return "\n".join(lines)


def client_capture(server_ip: str, uid: int) -> str:
    """`iptables-restore --noflush` input for the client pod: its connections to the
    server's app ports go to its sidecar, except the sidecar's own."""
    return "\n".join(
        [
            "*nat",
            f":{CHAIN} - [0:0]",
            f"-A OUTPUT -p tcp -j {CHAIN}",
            f"-A {CHAIN} -m owner --uid-owner {uid} -j RETURN",
            f"-A {CHAIN} -d {server_ip}/32 -p tcp --dport {sc.HTTP_PORT} "
            f"-j REDIRECT --to-ports {CLIENT_HTTP_PORT}",
            f"-A {CHAIN} -d {server_ip}/32 -p tcp --dport {sc.BULK_PORT} "
            f"-j REDIRECT --to-ports {CLIENT_BULK_PORT}",
            "COMMIT",
            "",
        ]
    )


def server_capture() -> str:
    """`iptables-restore --noflush` input for the server pod: inbound to the app's ports
    goes to its sidecar (the sidecar reaches the app on loopback, which is not captured)."""
    return "\n".join(
        [
            "*nat",
            f":{CHAIN} - [0:0]",
            f"-A PREROUTING -p tcp -j {CHAIN}",
            f"-A {CHAIN} -p tcp --dport {sc.HTTP_PORT} -j REDIRECT --to-ports {SERVER_HTTP_PORT}",
            f"-A {CHAIN} -p tcp --dport {sc.BULK_PORT} -j REDIRECT --to-ports {SERVER_BULK_PORT}",
            "COMMIT",
            "",
        ]
    )


def install_capture(netns_path: str, rules: str) -> None:
    try:
        subprocess.run(
            ["iptables-restore", "--noflush", "-w", "10"],
            input=rules,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            preexec_fn=nsutil.preexec_enter(netns_path),
        )
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise HaproxyError(f"capture rules in {netns_path} failed: {detail}") from e


def haproxy_uid() -> int:
    try:
        return pwd.getpwnam(USER).pw_uid
    except KeyError:
        raise HaproxyError(
            f"no user {USER!r}: Debian's haproxy package creates it (scripts/setup.sh)"
        ) from None


def stats(stats_socket: Path, timeout: float = 2.0) -> list[dict[str, str]]:
    """`show stat` from a sidecar's stats socket: one row per frontend, backend and server
    (HAProxy's CSV columns: pxname, svname, scur, stot, bin, bout, req_tot, ...)."""
    text = _command(stats_socket, "show stat", timeout)
    return list(csv.DictReader(io.StringIO(text.lstrip("# "))))


def _command(stats_socket: Path, command: str, timeout: float) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(stats_socket))
        s.sendall(command.encode() + b"\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode()


class HaproxyScenario:
    """A client-side and a server-side HAProxy, mTLS between them."""

    name = "sidecar-haproxy"

    def __init__(self, placement: str = "cross-node", cluster_name: str = "") -> None:
        self.placement = sc.check_placement(placement)
        self.cluster_name = cluster_name or ("hapx" if placement == "cross-node" else "haps")
        self._state_root: Path | None = None
        self._cluster_file: Path | None = None
        # Short: stats sockets live here, and a unix socket path has 107 bytes at most.
        self.files: Path | None = None
        self.cluster: mesh.Cluster | None = None

    def stats_socket(self, side: str) -> Path:
        if self.files is None:
            raise RuntimeError("the scenario is not running")
        return self.files / f"{side}.sock"

    def start(self, workdir: Path) -> Running:
        binary = haproxy_binary()
        uid = haproxy_uid()
        self._state_root = workdir / f"state-{self.cluster_name}"  # shared workdirs are fine
        self._cluster_file = sc.write_cluster_file(
            workdir, self.cluster_name, self.placement, False
        )
        try:
            self.files = Path(tempfile.mkdtemp(prefix=f"mb-{self.cluster_name}-"))
            cluster = mesh.up(self._cluster_file, self._state_root, mesh=False)
            self.cluster = cluster
            server_ip = sc.pod_ip(cluster, sc.SERVER_POD)
            tls = write_tls_files(self.files, cluster.spec.trust_domain, sc.NAMESPACE)
            configs = {
                "client": client_config(tls, self.stats_socket("client")),
                "server": server_config(tls, self.stats_socket("server")),
            }
            pods = {"client": sc.CLIENT_POD, "server": sc.SERVER_POD}
            pids: dict[str, list[int]] = {}
            for side, text in configs.items():
                cfg = self.files / f"{side}.cfg"
                cfg.write_text(text)
                name = f"haproxy-{side}"
                proc = spawn_in_netns(
                    sc.pod_netns(cluster, pods[side]),
                    # -db: stay in the foreground, one process (no master), so its pid is
                    # the proxy's whole cost and stopping it by pid stops it all.
                    [binary, "-db", "-f", str(cfg)],
                    sc.base_env(),
                    self.files,
                    cluster.state.log_dir / f"{name}.log",
                    cluster.state.pidfile_dir,
                    name,
                )
                pids[f"{side}-sidecar"] = [proc.pid]
            for side in configs:
                self._wait_ready(side)
            # Capture last: until both sidecars listen, nothing is redirected into a void.
            install_capture(sc.pod_netns(cluster, sc.SERVER_POD), server_capture())
            install_capture(sc.pod_netns(cluster, sc.CLIENT_POD), client_capture(server_ip, uid))
        except BaseException:
            self.stop()
            raise
        client_netns = sc.pod_netns(cluster, sc.CLIENT_POD)
        return Running(
            http=Endpoint(client_netns, server_ip, sc.HTTP_PORT),
            bulk=Endpoint(client_netns, server_ip, sc.BULK_PORT),
            proxies=pids,
            server=sc.server_pids(cluster),
            handshake=HandshakeTarget(
                netns=client_netns,
                host=server_ip,
                port=SERVER_HTTP_PORT,
                protocol=HTTP,
                app_port=sc.HTTP_PORT,
                server_identity=str(SpiffeId(cluster.spec.trust_domain, sc.NAMESPACE, "server")),
                # The client sidecar's own leaf (its PEM holds the key too).
                tls=ClientTls(cert=tls.generator, key=tls.generator, roots=tls.ca),
                # The client pod's capture covers only the app's two ports to the server.
                mark=0,
                server_roles=("server-sidecar",),
                origin=(
                    f"client pod netns (not captured: the capture covers only the app's "
                    f"ports) -> the server-side HAProxy's TLS port {SERVER_HTTP_PORT}, "
                    "one HTTP/1.1 request to the app per connection"
                ),
            ),
        )

    def _wait_ready(self, side: str) -> None:
        # The stats socket answers only once every listener of the config is bound.
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if "Pid:" in _command(self.stats_socket(side), "show info", 1.0):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        where = "" if self.cluster is None else f"; see {self.cluster.state.log_dir}"
        raise HaproxyError(f"the {side} HAProxy did not start in {READY_TIMEOUT:.0f} s{where}")

    def stop(self) -> None:
        if self._state_root is not None:
            mesh.down(self.cluster_name, self._state_root)
            shutil.rmtree(self._state_root, ignore_errors=True)
        if self._cluster_file is not None:
            self._cluster_file.unlink(missing_ok=True)
        if self.files is not None:
            shutil.rmtree(self.files, ignore_errors=True)
        self.cluster = None
