"""A worker's certificates: the owner process's, handed over on request and on rotation.

The owner is the one process that talks to the CA; a worker asks it for an identity's
certificate when a pod of that identity starts, and the owner sends each new one for an
identity a worker asked for as it arrives (rotation), so a worker never fetches, refreshes
or holds a certificate the owner does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

from meshcore.identity.certs import CertificateError, UpdateListener, WorkloadCertificate
from meshcore.identity.lifetime import usable
from meshcore.identity.spiffe import SpiffeId
from ztunnel.workers import codec

# How long a pod's start waits for the owner's answer (the owner itself may be waiting out
# a CA outage: it answers when its own attempt has an outcome).
ASK_TIMEOUT = 60.0


def to_message(cert: WorkloadCertificate) -> codec.Cert:
    return codec.Cert(
        identity=str(cert.identity),
        key_pem=cert.key_pem,
        chain_pem=tuple(cert.chain_pem),
        roots_pem=cert.roots_pem,
        serial=str(cert.serial),
        not_before=cert.not_before.timestamp(),
        not_after=cert.not_after.timestamp(),
    )


def from_message(msg: codec.Cert) -> WorkloadCertificate:
    """The certificate of a CERT message; CertificateError if its fields are not one."""
    try:
        return WorkloadCertificate(
            identity=SpiffeId.parse(msg.identity),
            key_pem=msg.key_pem,
            chain_pem=list(msg.chain_pem),
            roots_pem=msg.roots_pem,
            serial=int(msg.serial),
            not_before=datetime.fromtimestamp(msg.not_before, UTC),
            not_after=datetime.fromtimestamp(msg.not_after, UTC),
        )
    except (ValueError, OverflowError) as e:
        raise CertificateError(f"the owner sent an unusable certificate: {e}") from None


class RemoteCertificates:
    """A `CertificateSource` answered by the owner process."""

    def __init__(self, ask: Callable[[SpiffeId], None], timeout: float = ASK_TIMEOUT) -> None:
        self._ask = ask
        self._timeout = timeout
        self._certs: dict[SpiffeId, WorkloadCertificate] = {}
        self._waiting: dict[SpiffeId, list[asyncio.Future[WorkloadCertificate]]] = {}
        self._listeners: list[UpdateListener] = []

    async def get(self, identity: SpiffeId) -> WorkloadCertificate:
        cert = self._certs.get(identity)
        if cert is not None and usable(cert.not_after, datetime.now(UTC)):
            return cert
        fut: asyncio.Future[WorkloadCertificate] = asyncio.get_running_loop().create_future()
        waiters = self._waiting.setdefault(identity, [])
        waiters.append(fut)
        if len(waiters) == 1:
            self._ask(identity)
        try:
            return await asyncio.wait_for(fut, self._timeout)
        except TimeoutError:
            raise CertificateError(
                f"the owner process sent no certificate for {identity} in {self._timeout:.0f} s"
            ) from None
        finally:
            if fut in waiters:
                waiters.remove(fut)
            if not waiters:
                self._waiting.pop(identity, None)

    def deliver(self, cert: WorkloadCertificate) -> None:
        """A certificate from the owner: the answer to `get`, or a rotation."""
        rotated = cert.identity in self._certs
        self._certs[cert.identity] = cert
        for fut in self._waiting.pop(cert.identity, []):
            if not fut.done():
                fut.set_result(cert)
        if rotated:
            for listener in list(self._listeners):
                listener(cert)

    def failed(self, identity: SpiffeId, error: str) -> None:
        for fut in self._waiting.pop(identity, []):
            if not fut.done():
                fut.set_exception(CertificateError(error))

    def fail_all(self, error: str) -> None:
        """The owner is gone: nobody will answer."""
        for identity in list(self._waiting):
            self.failed(identity, error)

    def forget(self, identity: SpiffeId) -> None:
        self._certs.pop(identity, None)

    def snapshot(self) -> list[WorkloadCertificate]:
        return sorted(self._certs.values(), key=lambda c: c.identity)

    def on_update(self, callback: UpdateListener) -> Callable[[], None]:
        self._listeners.append(callback)

        def remove() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return remove
