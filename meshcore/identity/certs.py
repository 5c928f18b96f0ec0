"""Workload certificates: request them from the CA, keep them fresh, hand them out.

Invariants:
- One refresh task per identity. It fetches a certificate (a new ECDSA P-256 key and a
  SHA-256 CSR with the SPIFFE URI SAN only, no CN per request), then sleeps for half of the
  lifetime it has left by our clock and fetches again (`lifetime.refresh_delay`).
- A certificate that our clock says is not valid yet by more than the tolerated skew, or
  already expired, is refused like a failed fetch (`lifetime.issued_problem`).
- Keys, CSRs and chain checks are made by the certificate worker, a child process
  (`meshcore.identity.certworker_client`): this module, and so the tunnel, never imports
  `cryptography`. `new_key_and_csr` and `build_certificate` do the same work in process
  for other callers (tools, tests) and import it only when called.
- A failed fetch is retried with jittered exponential backoff (500 ms doubling, capped at
  30 s while a valid certificate is held, 5 s while none is: a pod is waiting), and never
  later than the held certificate's expiry; the previous certificate stays in use until a
  new one arrives or it expires.
- An expired certificate is never handed out: `get` then waits for the attempt in flight
  or raises the last error (a new pod stays pending; its traffic is refused, not passed).
- Concurrent `get` callers share the attempt in flight. With no certificate and the last
  attempt failed, `get` raises that error at once instead of waiting out the backoff
  (the caller is a connection that should fail fast with a reason).
- Time comes from the injected `clock` and `sleep`, so tests can drive refresh and backoff.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import structlog

from meshcore.http1.client import ProtocolError, post_unix
from meshcore.identity.certworker_client import CertWorkerClient, CertWorkerError, LeafFacts, NewKey
from meshcore.identity.lifetime import (
    BACKOFF_MAX,
    BACKOFF_MAX_WAITING,
    MIN_REFRESH_DELAY,
    backoff_delay,
    issued_problem,
    refresh_delay,
    usable,
)
from meshcore.identity.spiffe import SpiffeId

log = structlog.get_logger(__name__)

DEFAULT_TTL = timedelta(hours=24)
CA_REQUEST_TIMEOUT = 10.0
CA_PATH = "/v1/certificates"

Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[None]]
UpdateListener = Callable[["WorkloadCertificate"], None]


class CertificateError(Exception):
    """No certificate could be obtained; the message says what the CA or the check said."""


@dataclass(frozen=True, slots=True)
class WorkloadCertificate:
    identity: SpiffeId
    key_pem: bytes
    chain_pem: list[bytes]  # leaf first, root last (the CA's contract)
    roots_pem: bytes
    serial: int
    not_before: datetime
    not_after: datetime

    @property
    def presented_chain_pem(self) -> bytes:
        """The whole chain, leaf to root: what a context sends where it cannot be told to
        send its chain as loaded (meshcore.tls). The peer has the root already, but a
        certificate loaded with no chain certificates after it makes OpenSSL build the
        chain again from the trust store on every handshake: a full verification of our
        own certificate, about 200 us of CPU per handshake on each side
        (`benchmarks/tls_handshake.py`). Given a chain, OpenSSL sends it as it is."""
        return b"".join(_ensure_newline(pem) for pem in self.chain_pem)

    @property
    def chain_without_root_pem(self) -> bytes:
        """The leaf and any intermediates: the chain less its last certificate when that is
        one of our roots (which the peer holds already; upstream ztunnel does not send it
        either). For a context that sends its chain exactly as loaded (meshcore.tls): the
        peer then parses and checks one certificate less per handshake. A chain whose last
        certificate is not one of the roots is given whole."""
        chain = self.chain_pem
        if len(chain) > 1 and _der_of(chain[-1]) in _ders_of(self.roots_pem):
            chain = chain[:-1]
        return b"".join(_ensure_newline(pem) for pem in chain)


class CertificateSource(Protocol):
    """What a proxy asks of its certificates: the manager, or (in a tunnel's worker
    process) the certificates its owner process hands over."""

    async def get(self, identity: SpiffeId) -> WorkloadCertificate: ...

    def forget(self, identity: SpiffeId) -> None: ...

    def snapshot(self) -> list[WorkloadCertificate]: ...

    def on_update(self, callback: UpdateListener) -> Callable[[], None]: ...


class CertificateClient(Protocol):
    async def sign(self, csr_pem: bytes, ttl: timedelta) -> list[bytes]: ...


class CertCrypto(Protocol):
    """Makes keys and CSRs and checks chains (the certificate worker; a test may pass its own)."""

    async def new_key_and_csr(self, identity: str) -> NewKey: ...

    async def check_chain(
        self, identity: str, public_key_pem: bytes, chain_pem: list[bytes]
    ) -> LeafFacts: ...

    async def close(self) -> None: ...


def new_key_and_csr(identity: SpiffeId) -> tuple[bytes, bytes]:
    """A fresh EC P-256 key (PKCS#8 PEM) and a CSR whose only name is the URI SAN.

    In process, so it imports `cryptography`; the tunnel itself uses the worker."""
    from meshcore.identity import certcrypto

    made = certcrypto.new_key_and_csr(str(identity))
    return made.key_pem, made.csr_pem


def build_certificate(
    identity: SpiffeId, key_pem: bytes, chain_pem: list[bytes]
) -> WorkloadCertificate:
    """Check that the CA's answer is a chain for our key and identity, and wrap it.

    In process, so it imports `cryptography`; the tunnel itself uses the worker."""
    from meshcore.identity import certcrypto

    try:
        facts = certcrypto.check_chain(str(identity), certcrypto.public_key_pem(key_pem), chain_pem)
    except certcrypto.ChainError as e:
        raise CertificateError(str(e)) from e
    return _workload_certificate(
        identity, key_pem, chain_pem, LeafFacts(facts.serial, facts.not_before, facts.not_after)
    )


def _workload_certificate(
    identity: SpiffeId, key_pem: bytes, chain_pem: list[bytes], leaf: LeafFacts
) -> WorkloadCertificate:
    return WorkloadCertificate(
        identity=identity,
        key_pem=key_pem,
        chain_pem=list(chain_pem),
        roots_pem=chain_pem[-1],
        serial=leaf.serial,
        not_before=leaf.not_before,
        not_after=leaf.not_after,
    )


class LocalCAClient:
    """The built-in CA over its unix socket (controlplane.ca_server)."""

    def __init__(self, socket_path: Path | str, token: str) -> None:
        self._socket_path = str(socket_path)
        self._token = token

    async def sign(self, csr_pem: bytes, ttl: timedelta) -> list[bytes]:
        body = {"csr": csr_pem.decode(), "ttlSeconds": int(ttl.total_seconds())}
        headers = {"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"}
        try:
            async with asyncio.timeout(CA_REQUEST_TIMEOUT):
                status, raw = await post_unix(
                    self._socket_path, CA_PATH, json.dumps(body).encode(), headers, host="ca"
                )
        except (ProtocolError, OSError, TimeoutError) as e:
            # A timeout's own message is empty: say what timed out.
            problem = (
                f"no answer within {CA_REQUEST_TIMEOUT:g} s"
                if isinstance(e, TimeoutError)
                else str(e) or type(e).__name__
            )
            raise CertificateError(
                f"cannot reach the CA at {self._socket_path}: {problem}; "
                "check that the CA process runs and the socket path is right"
            ) from e
        text = raw.decode("utf-8", errors="replace")
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if status != 200:
            reason = doc.get("error") if isinstance(doc, dict) else None
            raise CertificateError(f"CA refused ({status}): {reason or text[:200]}")
        chain = doc.get("certChain") if isinstance(doc, dict) else None
        if not isinstance(chain, list) or not all(isinstance(c, str) for c in chain):
            raise CertificateError(f"CA answer has no certChain list: {text[:200]}")
        return [c.encode() for c in chain]


@dataclass(slots=True)
class _Entry:
    identity: SpiffeId
    cert: WorkloadCertificate | None = None
    error: CertificateError | None = None
    # The outcome of the attempt in flight; None while the worker sleeps.
    pending: asyncio.Future[WorkloadCertificate] | None = None
    task: asyncio.Task[None] | None = None
    failures: int = field(default=0)


class CertificateManager:
    def __init__(
        self,
        client: CertificateClient,
        ttl: timedelta = DEFAULT_TTL,
        *,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
        crypto: CertCrypto | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """`crypto` defaults to a certificate worker of our own; the manager closes it.
        `rand` draws the backoff jitter (a test passes a constant)."""
        self._client = client
        self._crypto: CertCrypto = crypto if crypto is not None else CertWorkerClient()
        self._ttl = ttl
        self._clock: Clock = clock or (lambda: datetime.now(UTC))
        self._sleep: Sleep = sleep or asyncio.sleep
        self._rand = rand
        self._entries: dict[SpiffeId, _Entry] = {}
        self._listeners: list[UpdateListener] = []
        self._closed = False

    async def get(self, identity: SpiffeId) -> WorkloadCertificate:
        entry = self._ensure(identity)
        cert = entry.cert
        if cert is not None and usable(cert.not_after, self._clock()):
            return cert
        if entry.pending is not None:
            # shield: one caller giving up must not cancel the attempt the others share.
            return await asyncio.shield(entry.pending)
        if entry.error is not None:  # the worker sleeps only after an outcome
            raise entry.error
        assert cert is not None
        raise CertificateError(
            f"the certificate for {identity} expired at {cert.not_after.isoformat()} and no "
            "new one has come yet"
        )

    def prefetch(self, identity: SpiffeId) -> None:
        """Start fetching and refreshing `identity` now (a local workload has it)."""
        self._ensure(identity)

    def forget(self, identity: SpiffeId) -> None:
        """Stop refreshing `identity` (the last local workload with it went away)."""
        entry = self._entries.pop(identity, None)
        if entry is not None:
            self._stop(entry, f"certificate for {identity} was dropped")

    def snapshot(self) -> list[WorkloadCertificate]:
        return sorted(
            (e.cert for e in self._entries.values() if e.cert is not None),
            key=lambda c: c.identity,
        )

    def on_update(self, callback: UpdateListener) -> Callable[[], None]:
        """Call `callback` with each new certificate; returns a function that unsubscribes."""
        self._listeners.append(callback)

        def remove() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return remove

    async def close(self) -> None:
        self._closed = True
        entries, self._entries = list(self._entries.values()), {}
        tasks = [e.task for e in entries if e.task is not None]
        for entry in entries:
            self._stop(entry, "certificate manager is closed")
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._crypto.close()

    def _ensure(self, identity: SpiffeId) -> _Entry:
        if self._closed:
            raise CertificateError("certificate manager is closed")
        entry = self._entries.get(identity)
        if entry is None:
            entry = _Entry(identity)
            # Created here, not in the worker, so a `get` right after sees an attempt in
            # flight even before the worker task has first run.
            entry.pending = asyncio.get_running_loop().create_future()
            entry.task = asyncio.get_running_loop().create_task(
                self._worker(entry), name=f"cert-refresh {identity}"
            )
            self._entries[identity] = entry
        return entry

    def _stop(self, entry: _Entry, reason: str) -> None:
        if entry.task is not None:
            entry.task.cancel()
        if entry.pending is not None and not entry.pending.done():
            _fail(entry.pending, CertificateError(reason))
        entry.pending = None

    async def _worker(self, entry: _Entry) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if entry.pending is None:
                entry.pending = loop.create_future()
            fut = entry.pending
            try:
                cert = await self._fetch(entry.identity)
            except CertificateError as e:
                entry.error = e
                entry.failures += 1
                delay = self._retry_delay(entry)
                _fail(fut, e)
                log.warning(
                    "certificate fetch failed",
                    identity=str(entry.identity),
                    error=str(e),
                    retry_in_s=delay,
                    have_previous=entry.cert is not None,
                )
            else:
                entry.cert, entry.error, entry.failures = cert, None, 0
                if not fut.done():
                    fut.set_result(cert)
                delay = refresh_delay(cert.not_after, self._clock())
                self._notify(cert)
            entry.pending = None
            await self._sleep(delay)

    def _retry_delay(self, entry: _Entry) -> float:
        """The backoff after a failed fetch; a held certificate is retried before it expires
        (and once it has, the shorter cap of an identity with none applies)."""
        now = self._clock()
        held = entry.cert is not None and usable(entry.cert.not_after, now)
        delay = backoff_delay(entry.failures, waiting=not held, rand=self._rand())
        if held:
            assert entry.cert is not None
            left = (entry.cert.not_after - now).total_seconds()
            delay = min(delay, max(MIN_REFRESH_DELAY, left))
        return delay

    async def _fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        try:
            made = await self._crypto.new_key_and_csr(str(identity))
        except CertWorkerError as e:
            raise CertificateError(f"no key and CSR for {identity}: {e}") from e
        except Exception as e:  # a worker-client bug must not kill the refresh loop either
            raise CertificateError(f"no key and CSR for {identity}: {e!r}") from e
        try:
            chain = await self._client.sign(made.csr_pem, self._ttl)
        except CertificateError:
            raise
        except Exception as e:  # a client bug must not kill the refresh loop
            raise CertificateError(f"certificate request for {identity} failed: {e!r}") from e
        try:
            leaf = await self._crypto.check_chain(str(identity), made.public_key_pem, chain)
        except CertWorkerError as e:
            # The worker's own words: what is wrong with the chain, or what the worker did.
            raise CertificateError(str(e)) from e
        except Exception as e:
            raise CertificateError(f"chain check for {identity} failed: {e!r}") from e
        problem = issued_problem(leaf.not_before, leaf.not_after, self._clock())
        if problem is not None:
            raise CertificateError(f"the CA's certificate for {identity} is refused: {problem}")
        return _workload_certificate(identity, made.key_pem, chain, leaf)

    def _notify(self, cert: WorkloadCertificate) -> None:
        for callback in list(self._listeners):
            try:
                callback(cert)
            except Exception:
                log.exception("certificate update listener failed", identity=str(cert.identity))


def _fail(fut: asyncio.Future[WorkloadCertificate], error: CertificateError) -> None:
    if fut.done():
        return
    fut.set_exception(error)
    # Mark the exception as retrieved: nobody may be waiting, and asyncio would otherwise
    # log "exception was never retrieved" for an outcome that `get` reports another way.
    fut.exception()


def _der_of(pem: bytes) -> bytes:
    ders = _ders_of(pem)
    return ders[0] if ders else b""


def _ders_of(pem: bytes) -> list[bytes]:
    """The DER of every certificate in a PEM bundle (compared as bytes: the same certificate
    in other PEM line lengths or with other text around it is still the same)."""
    out = []
    for block in pem.split(b"-----END CERTIFICATE-----")[:-1]:
        start = block.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            text = block[start:].decode("ascii", "replace") + "-----END CERTIFICATE-----\n"
            try:
                out.append(ssl.PEM_cert_to_DER_cert(text))
            except ValueError:
                continue
    return out


def _ensure_newline(pem: bytes) -> bytes:
    return pem if pem.endswith(b"\n") else pem + b"\n"


__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_MAX_WAITING",
    "CertCrypto",
    "CertificateClient",
    "CertificateError",
    "CertificateManager",
    "CertificateSource",
    "LocalCAClient",
    "WorkloadCertificate",
    "backoff_delay",
    "build_certificate",
    "new_key_and_csr",
]
