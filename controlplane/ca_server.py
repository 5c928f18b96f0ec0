"""The built-in CA served over a unix socket: nodes trade a token and a CSR for a chain.

`POST /v1/certificates` with `Authorization: Bearer <node token>` and JSON
`{"csr": "<pem>", "ttlSeconds": 86400}` answers 200 `{"certChain": [leaf, ..., root]}`,
401 (missing or unknown token), 403 (this node may not hold that identity, or the caller's
uid is not an allowed one), 429 (the node asked for too many certificates; `Retry-After`
says when to come back), 400 (bad JSON, bad CSR, bad lifetime) or 503 (the authorizer
could not decide). Errors are JSON `{"error": "<what to check>"}`.

Invariants:
- The identity issued is the CSR's one URI SAN, and only if `may_issue(node, identity)`
  says the node runs a workload with it: a node can never get another node's identities.
- The socket file is 0600 from the moment it has its final name (bound under a temporary
  name, chmod-ed, then renamed into place), and a caller whose uid (SO_PEERCRED) is not an
  allowed one (by default the CA's own) is refused before its token is even looked at.
- The lifetime issued is the one asked for, capped at the server's maximum
  (`--max-cert-ttl-seconds`, default `MAX_LEAF_TTL`): a tunnel asking for more gets less,
  as Istio's CA caps a requested TTL.
- Issuance is rate-limited per node (a token bucket per node name, as the gRPC CA's), and
  charged before the CSR is parsed, so a node's tunnel cannot keep the CA signing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
import yaml
from aiohttp import web

from controlplane.ca import (
    DEFAULT_LEAF_TTL,
    MAX_LEAF_TTL,
    CAError,
    CertificateAuthority,
    csr_identity,
    parse_csr,
)
from controlplane.ca_grpc_auth import RateLimiter
from meshcore.defaults import SERVICE_ACCOUNT, TRUST_DOMAIN
from meshcore.identity.spiffe import IdentityError, SpiffeId
from meshcore.localtrust import RateLog, default_uids, parse_uids, peer_cred, refusal
from meshcore.runtime import accepterrors

log = structlog.get_logger(__name__)

CERTIFICATES_PATH = "/v1/certificates"
MAX_BODY = 64 * 1024  # a CSR is ~500 bytes; anything near this is not a CSR
# Per node, as the gRPC CA: a node starting 100 pods gets them at once, then 10 a second.
RATE_PER_S = 10.0
BURST = 100

Authorizer = Callable[[str, SpiffeId], bool]


class CAServerError(Exception):
    """The CA server cannot start or read its inputs; the message says which file or path."""


class CAServer:
    def __init__(
        self,
        ca: CertificateAuthority,
        tokens: Mapping[str, str],
        may_issue: Authorizer,
        allowed_uids: frozenset[int] | None = None,
        limiter: RateLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_ttl: timedelta = MAX_LEAF_TTL,
    ) -> None:
        self._ca = ca
        self._max_ttl = min(max_ttl, MAX_LEAF_TTL)
        self._tokens = dict(tokens)
        self._may_issue = may_issue
        self.allowed_uids = default_uids() if allowed_uids is None else allowed_uids
        self._limiter = limiter if limiter is not None else RateLimiter(RATE_PER_S, BURST)
        self._clock = clock
        self._refusal_log = RateLog()
        # Requests refused before any CA work, by reason: what an operator reads first.
        self.refused: dict[str, int] = {"uid": 0, "rate": 0}
        self._runner: web.AppRunner | None = None
        self._path: Path | None = None

    async def start(self, path: Path | str) -> None:
        path = Path(path)
        sock = _bind_private_unix(path)
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post(CERTIFICATES_PATH, self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.SockSite(runner, sock).start()
        except BaseException:
            await runner.cleanup()
            sock.close()
            path.unlink(missing_ok=True)
            raise
        self._runner, self._path = runner, path
        log.info("CA listening", socket=str(path), trust_domain=self._ca.trust_domain)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None

    def _node_for(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return node_of_token(self._tokens, token.strip())

    def _peer_refusal(self, request: web.Request) -> str | None:
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return "the caller's connection is gone"
        try:
            return refusal(peer_cred(sock), self.allowed_uids)
        except OSError as e:
            return f"cannot read the caller's credentials: {e}"

    def _log_refusal(self, reason: str, why: str) -> None:
        self.refused[reason] += 1
        suppressed = self._refusal_log.due(self._clock())
        if suppressed is not None:
            log.warning(
                "CA caller refused", reason=why, refused=dict(self.refused), not_logged=suppressed
            )

    async def _handle(self, request: web.Request) -> web.Response:
        why = self._peer_refusal(request)
        if why is not None:
            self._log_refusal("uid", why)
            return _error(403, f"refused: {why}")
        node = self._node_for(request)
        if node is None:
            return _error(401, "missing or unknown bearer token; check the node's CA token")
        if not self._limiter.allow(node, self._clock()):
            why = (
                f"node {node!r} asked for more than {self._limiter.burst:g} certificates at "
                f"once ({self._limiter.rate:g}/s after that); retry later"
            )
            self._log_refusal("rate", why)
            retry = max(1, math.ceil(1.0 / self._limiter.rate))
            return _error(429, f"rate limited: {why}", {"Retry-After": str(retry)})
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "request body is not JSON")
        try:
            csr_pem, ttl = _parse_request(body)
            identity = csr_identity(parse_csr(csr_pem))
        except (CAError, ValueError) as e:
            return _error(400, str(e))
        try:
            allowed = self._may_issue(node, identity)
        except Exception as e:
            log.exception("authorizer failed", node=node, identity=str(identity))
            return _error(503, f"cannot decide whether node {node} may hold {identity}: {e}")
        if not allowed:
            log.warning("certificate refused", node=node, identity=str(identity))
            return _error(403, f"node {node!r} runs no workload with identity {identity}")
        ttl = min(ttl, self._max_ttl)
        try:
            chain = self._ca.sign_csr(csr_pem, identity, ttl)
        except CAError as e:
            return _error(400, str(e))
        log.info(
            "certificate issued", node=node, identity=str(identity), ttl_s=int(ttl.total_seconds())
        )
        return web.json_response({"certChain": [pem.decode() for pem in chain]})


def node_of_token(tokens: Mapping[str, str], presented: str) -> str | None:
    """The node whose token `presented` is, or None. Every token is compared, each in
    constant time: the timing must not reveal a prefix, nor which entry matched."""
    encoded = presented.encode()
    node = None
    for known, name in tokens.items():
        if hmac.compare_digest(known.encode(), encoded):
            node = name
    return node


def _parse_request(body: Any) -> tuple[bytes, timedelta]:
    if not isinstance(body, dict):
        raise ValueError('request must be a JSON object {"csr": ..., "ttlSeconds": ...}')
    csr = body.get("csr")
    if not isinstance(csr, str) or not csr:
        raise ValueError('"csr" must be a PEM string')
    ttl_s = body.get("ttlSeconds", int(DEFAULT_LEAF_TTL.total_seconds()))
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int):
        raise ValueError('"ttlSeconds" must be an integer number of seconds')
    return csr.encode(), timedelta(seconds=ttl_s)


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _bind_private_unix(path: Path) -> socket.socket:
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise CAServerError(f"{path} exists and is not a socket; remove it or pick another")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            pass  # stale socket of a process that is gone: replaced below
        else:
            raise CAServerError(f"another process is serving on {path}; stop it first")
        finally:
            probe.close()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        tmp.unlink(missing_ok=True)
        raise CAServerError(f"cannot listen on {path}: {e}") from e
    return sock


# --- the standalone process: tokens and authorization from files -----------------------


def load_tokens(path: Path) -> dict[str, str]:
    """token -> node name, from a YAML or JSON mapping."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CAServerError(f"cannot read tokens file {path}: {e}") from e
    if not isinstance(doc, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and v for k, v in doc.items()
    ):
        raise CAServerError(f"{path} must be a mapping of token string -> node name")
    return dict(doc)


def parse_workload_grants(doc: Any) -> frozenset[tuple[str, SpiffeId]]:
    """The (node, identity) pairs a local-mode workloads document allows."""
    workloads = doc.get("workloads") if isinstance(doc, dict) else None
    if workloads is None:
        return frozenset()
    if not isinstance(workloads, list):
        raise ValueError('"workloads" must be a list')
    grants = set()
    for i, w in enumerate(workloads):
        if not isinstance(w, dict):
            raise ValueError(f"workloads[{i}] is not a mapping")
        node, namespace = w.get("node"), w.get("namespace")
        if not isinstance(node, str) or not node or not isinstance(namespace, str):
            continue  # a workload with no node cannot be vouched for by any node
        try:
            identity = SpiffeId(
                str(w.get("trustDomain") or TRUST_DOMAIN),
                namespace,
                str(w.get("serviceAccount") or SERVICE_ACCOUNT),
            )
        except IdentityError as e:
            raise ValueError(f"workloads[{i}] ({w.get('name')!r}): {e}") from e
        grants.add((node, identity))
    return frozenset(grants)


@dataclass(slots=True)
class WorkloadsFileAuthorizer:
    """Allows identity X on node N iff the workloads file has a workload with both."""

    path: Path
    _stamp: tuple[int, int] | None = None
    _grants: frozenset[tuple[str, SpiffeId]] = frozenset()

    def __call__(self, node: str, identity: SpiffeId) -> bool:
        return (node, identity) in self._current()

    def _current(self) -> frozenset[tuple[str, SpiffeId]]:
        try:
            st = self.path.stat()
        except OSError as e:
            raise CAServerError(f"cannot read workloads file {self.path}: {e}") from e
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                doc = yaml.safe_load(self.path.read_text())
                grants = parse_workload_grants(doc)
            except (OSError, yaml.YAMLError, ValueError) as e:
                raise CAServerError(f"workloads file {self.path} is invalid: {e}") from e
            self._grants, self._stamp = grants, stamp
        return self._grants


async def _serve(args: argparse.Namespace) -> None:
    accepterrors.install(asyncio.get_running_loop())
    ca = CertificateAuthority.load_or_create(Path(args.state_dir), args.trust_domain)
    tokens = load_tokens(Path(args.tokens_file))
    server = CAServer(
        ca,
        tokens,
        WorkloadsFileAuthorizer(Path(args.workloads_file)),
        allowed_uids=args.peer_uids,
        limiter=RateLimiter(args.rate_per_node, args.burst_per_node),
        max_ttl=timedelta(seconds=args.max_cert_ttl_seconds),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start(Path(args.socket))
    try:
        await stop.wait()
    finally:
        await server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controlplane.ca_server", description="The mesh CA on a unix socket."
    )
    parser.add_argument("--state-dir", required=True, help="directory for ca/root-*.pem")
    parser.add_argument("--socket", required=True, help="unix socket path to listen on")
    parser.add_argument("--tokens-file", required=True, help="YAML/JSON token -> node name")
    parser.add_argument("--trust-domain", default=TRUST_DOMAIN)
    parser.add_argument("--workloads-file", required=True, help="local-mode workloads YAML")
    parser.add_argument(
        "--peer-uids",
        type=parse_uids,
        default="",
        help="comma-separated uids that may connect; default: the CA's own",
    )
    parser.add_argument("--rate-per-node", type=float, default=RATE_PER_S)
    parser.add_argument("--burst-per-node", type=int, default=BURST)
    parser.add_argument(
        "--max-cert-ttl-seconds",
        type=int,
        default=int(MAX_LEAF_TTL.total_seconds()),
        help="cap on a certificate's lifetime; a longer request is issued this long "
        f"(1..{int(MAX_LEAF_TTL.total_seconds())}; default 7 days)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.max_cert_ttl_seconds <= MAX_LEAF_TTL.total_seconds():
        parser.error(
            f"--max-cert-ttl-seconds must be within 1..{int(MAX_LEAF_TTL.total_seconds())}"
        )
    if not (args.rate_per_node > 0 and args.burst_per_node >= 1):
        parser.error("--rate-per-node must be positive and --burst-per-node at least 1")
    try:
        asyncio.run(_serve(args))
    except (CAError, CAServerError) as e:
        print(f"ca_server: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
