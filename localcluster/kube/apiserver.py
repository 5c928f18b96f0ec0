"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, controller-manager, scheduler.

The binaries are v1.20.2, built from Debian's source package by `scripts/kube-build.sh` and
cached (`binaries_dir()`); etcd is Debian's. Everything listens on 127.0.0.1 only:
- etcd on two free ports, `--unsafe-no-fsync` (a test and demo store, rebuilt each start);
- kube-apiserver on a free secure port, its insecure port off, with a serving certificate of
  our own CA (so clients verify it), static bearer tokens (`tokens.csv`; an admin in
  `system:masters`), RBAC, service-account tokens signed by a key of ours;
- controller-manager and scheduler with their own ports off (v1.20 otherwise opens ports
  on 0.0.0.0) and no leader election.

Invariants:
- every process is started in the caller's network namespace (loopback), recorded by pid and
  start time in `<dir>/pids`, and stopped by that record, TERM then KILL, never by name;
- `start` either returns a ready API (`/readyz` answers ok) or stops what it started and raises
  `KubeError` naming the log to read;
- the state directory holds everything (etcd data, keys, logs, kubeconfig); `stop` leaves the
  logs for a post-mortem and removes the etcd data.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from localcluster.kube.audit import AUDIT_POLICY
from localcluster.processes import (
    PIDFILE_SUFFIX,
    ManagedProcess,
    ProcessRecord,
    proc_stat,
    stop_recorded,
)

KUBE_VERSION = "1.20.2"
SERVICE_CIDR = "10.96.0.0/16"
ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "ambient-admin"
READY_TIMEOUT = 60.0
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")


class KubeError(RuntimeError):
    """The Kubernetes control plane could not be built, found or started."""


def binaries_dir() -> Path:
    """Where scripts/kube-build.sh caches the three binaries (KUBE_CACHE overrides the root)."""
    root = os.environ.get("KUBE_CACHE")
    if root:
        return Path(root) / "bin"
    home = Path(os.environ.get("HOME") or "/root")
    return home / ".cache" / "ambient-mesh" / f"k8s-{KUBE_VERSION}" / "bin"


def find_binaries() -> dict[str, Path]:
    """The three control-plane binaries and etcd, or `KubeError` saying how to get them.

    On PATH first (setup links them into /usr/local/bin), else straight from the cache."""
    d = binaries_dir()
    found: dict[str, Path] = {}
    for b in (*BINARIES, "etcd"):
        on_path = shutil.which(b)
        if on_path is not None:
            found[b] = Path(on_path)
        elif os.access(d / b, os.X_OK):
            found[b] = d / b
    missing = [b for b in BINARIES if b not in found]
    if missing:
        raise KubeError(
            f"missing {', '.join(missing)}: run `bash scripts/kube-build.sh` as root (about 8 "
            f"minutes once; the binaries are cached in {d})"
        )
    if "etcd" not in found:
        raise KubeError("etcd is not on PATH: install Debian's etcd-server (scripts/setup.sh)")
    return found


def kubectl() -> str:
    """kubectl of the server's own version (the build's cache) when there, else PATH's."""
    cached = binaries_dir() / "kubectl"
    if os.access(cached, os.X_OK):
        return str(cached)
    found = shutil.which("kubectl")
    if found is None:
        raise KubeError("kubectl is not on PATH: run scripts/setup.sh as root")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Token:
    """A static bearer token of tokens.csv: who presents it and in which groups."""

    token: str
    user: str
    groups: tuple[str, ...] = ()


@dataclass(slots=True)
class KubeControlPlane:
    """One etcd + apiserver + controller-manager + scheduler, rooted at `dir`."""

    dir: Path
    server: str = ""
    admin_token: str = ""
    tokens: dict[str, Token] = field(default_factory=dict)
    processes: list[ManagedProcess] = field(default_factory=list)
    # Tests and benchmarks: the processes end with the one that started them. A local
    # cluster's control plane outlives `ambientctl up`, so it leaves this off.
    die_with_parent: bool = False

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def ca_path(self) -> Path:
        """The CA that signed the API server's serving certificate (and is the SA ca.crt)."""
        return self.pki / "ca.crt"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    @property
    def pidfile_dir(self) -> Path:
        return self.dir / "pids"

    @property
    def audit_log(self) -> Path:
        """Every request the API server answered, one JSON event per line (level Metadata):
        who asked what (the RBAC test reads it)."""
        return self.log_dir / "audit.log"

    def start(self, extra_tokens: Sequence[Token] = (), timeout: float = READY_TIMEOUT) -> None:
        bins = find_binaries()
        self.dir.mkdir(parents=True, exist_ok=True)
        # A previous run's processes (a crash) are stopped by their records before anything.
        stop_recorded(self.pidfile_dir)
        shutil.rmtree(self.dir / "etcd", ignore_errors=True)
        self.pki.mkdir(parents=True, exist_ok=True)
        write_pki(self.pki)
        self.admin_token = secrets.token_hex(16)
        self.tokens = {
            t.user: t
            for t in (Token(self.admin_token, ADMIN_USER, ("system:masters",)), *extra_tokens)
        }
        with open(self.pki / "tokens.csv", "w", encoding="ascii") as f:
            for i, t in enumerate(self.tokens.values()):
                groups = ",".join(t.groups)
                f.write(f'{t.token},{t.user},uid-{i},"{groups}"\n')
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        self.server = f"https://127.0.0.1:{api_port}"
        write_kubeconfig(self.kubeconfig, self.server, self.ca_path, self.admin_token)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.pki / "audit-policy.yaml").write_text(AUDIT_POLICY, encoding="utf-8")
        try:
            self._spawn(
                "etcd",
                [
                    str(bins["etcd"]),
                    "--name=ambient",
                    f"--data-dir={self.dir / 'etcd'}",
                    f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                    f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                    f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-cluster=ambient=http://127.0.0.1:{peer_port}",
                    "--unsafe-no-fsync",
                    "--log-level=warn",
                ],
            )
            self._spawn(
                "kube-apiserver",
                [
                    str(bins["kube-apiserver"]),
                    f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--secure-port={api_port}",
                    "--insecure-port=0",
                    f"--tls-cert-file={self.pki / 'apiserver.crt'}",
                    f"--tls-private-key-file={self.pki / 'apiserver.key'}",
                    f"--client-ca-file={self.ca_path}",
                    f"--token-auth-file={self.pki / 'tokens.csv'}",
                    "--authorization-mode=RBAC",
                    f"--service-account-issuer={ISSUER}",
                    f"--service-account-key-file={self.pki / 'sa.pub'}",
                    f"--service-account-signing-key-file={self.pki / 'sa.key'}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--endpoint-reconciler-type=none",
                    "--allow-privileged=true",
                    f"--audit-policy-file={self.pki / 'audit-policy.yaml'}",
                    f"--audit-log-path={self.audit_log}",
                    "--audit-log-maxsize=100",
                    "--audit-log-maxbackup=1",
                    "--profiling=false",
                    "--v=1",
                ],
            )
            self.wait_ready(timeout)
            kc = str(self.kubeconfig)
            self._spawn(
                "kube-controller-manager",
                [
                    str(bins["kube-controller-manager"]),
                    f"--kubeconfig={kc}",
                    f"--authentication-kubeconfig={kc}",
                    f"--authorization-kubeconfig={kc}",
                    "--port=0",
                    "--secure-port=0",
                    "--leader-elect=false",
                    "--controllers=*,-nodeipam",
                    # The local kubelet heartbeats, but a paused test must not see its pods
                    # evicted for a missed beat.
                    "--node-monitor-grace-period=1000h",
                    f"--service-account-private-key-file={self.pki / 'sa.key'}",
                    f"--root-ca-file={self.ca_path}",
                    "--use-service-account-credentials=false",
                    "--v=1",
                ],
            )
            self._spawn(
                "kube-scheduler",
                [
                    str(bins["kube-scheduler"]),
                    f"--kubeconfig={kc}",
                    f"--authentication-kubeconfig={kc}",
                    f"--authorization-kubeconfig={kc}",
                    "--port=0",
                    "--secure-port=0",
                    "--leader-elect=false",
                    "--v=1",
                ],
            )
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, argv: list[str]) -> None:
        self.pidfile_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        die = self.die_with_parent

        def preexec() -> None:
            if die:
                # A test run killed outright (a timeout's SIGKILL) must not leave an API
                # server behind: the kernel stops the child with its parent.
                _set_pdeathsig(signal.SIGKILL)

        with open(log_path, "ab") as out:
            try:
                popen = subprocess.Popen(
                    argv,
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir)},
                    cwd=str(self.dir),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=preexec,
                )
            except OSError as e:
                raise KubeError(f"cannot start {argv[0]}: {e}") from e
        st = proc_stat(popen.pid)
        record = ProcessRecord(
            name=name,
            pid=popen.pid,
            start_time=st[2] if st is not None else 0,
            argv=tuple(argv),
            netns_path="",
            log_path=str(log_path),
        )
        pidfile = self.pidfile_dir / f"{name}{PIDFILE_SUFFIX}"
        pidfile.write_text(record.to_json(), encoding="utf-8")
        self.processes.append(ManagedProcess(record, popen, pidfile))

    def restart_apiserver(self, timeout: float = READY_TIMEOUT) -> None:
        """Stop the API server and start it again on the same store and port: its watch
        cache starts empty, so a watcher resuming from before gets 410 Gone."""
        old = next(p for p in self.processes if p.record.name == "kube-apiserver")
        old.stop()
        self.processes.remove(old)
        self._spawn("kube-apiserver", list(old.record.argv))
        self.wait_ready(timeout, watched=("etcd", "kube-apiserver"))
        # A controller-manager that was itself still starting exits when it finds no API
        # server ("unable to get any supported resources"): start it (or the scheduler) again.
        for p in list(self.processes):
            if not p.alive():
                p.stop()
                self.processes.remove(p)
                self._spawn(p.record.name, list(p.record.argv))

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))

    def wait_ready(self, timeout: float, watched: Sequence[str] | None = None) -> None:
        """Until /readyz answers ok; a watched process (default: all) exiting is an error."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            for p in self.processes:
                if (watched is None or p.record.name in watched) and not p.alive():
                    raise KubeError(
                        f"{p.record.name} exited while starting; read {p.record.log_path}"
                    )
            try:
                status, body = self.request("GET", "/readyz")
                if status == 200:
                    return
                last = f"HTTP {status}: {body[:200]!r}"
            except OSError as e:
                last = str(e)
            time.sleep(0.25)
        raise KubeError(
            f"kube-apiserver not ready after {timeout:.0f} s ({last}); read "
            f"{self.log_dir / 'kube-apiserver.log'}"
        )

    def request(
        self, method: str, path: str, body: object | None = None, token: str | None = None
    ) -> tuple[int, bytes]:
        """One blocking call to the API server (setup and tests; the mesh uses async clients)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.admin_token}")
        if data is not None:
            ctype = "application/merge-patch+json" if method == "PATCH" else "application/json"
            req.add_header("Content-Type", ctype)
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=10) as r:
                return int(r.status), bytes(r.read())
        except urllib.error.HTTPError as e:
            return int(e.code), bytes(e.read())

    def stop(self) -> None:
        # Scheduler and controller-manager first, etcd last: nothing writes to a gone store.
        for p in reversed(self.processes):
            p.stop()
        self.processes.clear()
        stop_recorded(self.pidfile_dir)
        shutil.rmtree(self.dir / "etcd", ignore_errors=True)


_PR_SET_PDEATHSIG = 1


def _set_pdeathsig(sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def write_kubeconfig(path: Path, server: str, ca: Path, token: str) -> None:
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "ambient", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "ambient", "context": {"cluster": "ambient", "user": "admin"}}],
        "current-context": "ambient",
    }
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
    os.replace(tmp, path)


def kubernetes_service_ip() -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The ClusterIP the API server gives `default/kubernetes`: its service range's first."""
    return ipaddress.ip_network(SERVICE_CIDR)[1]


def write_pki(pki: Path) -> None:
    """A CA, the API server's serving certificate (127.0.0.1, localhost, the `kubernetes`
    Service's ClusterIP and names up to kubernetes.default.svc.cluster.local), and the
    service-account signing key pair. Kept across restarts of the same directory."""
    if all((pki / n).exists() for n in ("ca.crt", "apiserver.crt", "apiserver.key", "sa.key")):
        return
    # Imported here: only the set-up of a control plane needs it.
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ambient-kube-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default"),
        x509.DNSName("kubernetes.default.svc"),
        x509.DNSName("kubernetes.default.svc.cluster.local"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        # The ClusterIP of `default/kubernetes`: the API server gives it the first address
        # of its service range; in-cluster clients verify the certificate against it.
        x509.IPAddress(kubernetes_service_ip()),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = serialization.Encoding.PEM
    nopass = serialization.NoEncryption()
    pkcs8 = serialization.PrivateFormat.PKCS8
    files = {
        "ca.key": ca_key.private_bytes(pem, pkcs8, nopass),
        "ca.crt": ca.public_bytes(pem),
        "apiserver.key": key.private_bytes(pem, pkcs8, nopass),
        "apiserver.crt": cert.public_bytes(pem),
        "sa.key": sa_key.private_bytes(pem, pkcs8, nopass),
        "sa.pub": sa_key.public_key().public_bytes(
            pem, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }
    for name, data in files.items():
        fd = os.open(pki / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


@contextlib.contextmanager
def running(dir: Path, extra_tokens: Sequence[Token] = ()):  # type: ignore[no-untyped-def]
    """A control plane for the duration of a `with` block (tests, benchmarks)."""
    cp = KubeControlPlane(dir, die_with_parent=True)
    cp.start(extra_tokens)
    try:
        yield cp
    finally:
        cp.stop()
