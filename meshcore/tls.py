"""TLS for HBONE: SSL contexts built from a workload certificate, and peer verification.

Invariants of every context built here:
- TLS 1.3 only, ALPN `h2`, the peer must present a certificate that chains to the mesh
  roots (and only those: no system trust store), no hostname check (identities are SPIFFE
  URI SANs, checked after the handshake by `verify_server` / `verify_client`), no session
  tickets or resumption. A peer chain verified once is remembered while it is valid, so a
  peer that connects again with the same chain is not verified again
  (`meshcore.verifiedchains`: the same answer, without the cost).
- TLS 1.3 cipher suites restricted to AES-256-GCM and AES-128-GCM (see
  `_restrict_tls13_ciphersuites` for how, and when it is skipped).
- Our certificate goes out as the leaf and its intermediates, exactly as loaded, without
  the root the peer holds (`send_chain_as_loaded`; where that mode cannot be set, the whole
  chain, root included, as before).
- The private key reaches OpenSSL through an anonymous in-memory file when the kernel has
  one (memfd), otherwise through a 0600 file in a private temporary directory; either is
  gone as soon as `load_cert_chain` returns.

Callers using asyncio must pass `server_hostname=""` to `create_connection` with a client
context: check_hostname is off and no SNI is sent.
"""

from __future__ import annotations

import ctypes
import os
import ssl
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from meshcore import verifiedchains
from meshcore.identity.certs import WorkloadCertificate
from meshcore.identity.spiffe import IdentityError, SpiffeId

log = structlog.get_logger(__name__)

ALPN_H2 = "h2"
TLS13_CIPHERSUITES = ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256")


class PeerVerificationError(Exception):
    """The TLS peer's certificate does not carry an identity this connection accepts."""


class TLSConfigError(Exception):
    """An SSL context could not be built as the mesh requires."""


def server_context(cert: WorkloadCertificate, remember_chains: bool = True) -> ssl.SSLContext:
    """`remember_chains`: a peer chain verified once is not verified again while it is
    valid (`meshcore.verifiedchains`)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(ctx, cert, remember_chains)
    # OP_NO_TICKET alone still makes a TLS 1.3 server send stateful tickets; zero tickets
    # means no resumption at all, so every connection proves its identity afresh.
    ctx.num_tickets = 0
    return ctx


def client_context(cert: WorkloadCertificate, remember_chains: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _configure(ctx, cert, remember_chains)
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket, peercert: object = None) -> SpiffeId:
    """The SPIFFE identity in the peer's leaf certificate (exactly one is required).
    `peercert`: `ssl_object.getpeercert()` as the event loop's TLS transport already made
    it (its `peercert` extra info), so it is not made twice; None: made here."""
    # The dict form is what OpenSSL parsed during the handshake: no second parse per
    # connection, and no `cryptography` in the tunnel. It is filled in only for a verified
    # certificate, which every context built here requires.
    try:
        cert = peercert if isinstance(peercert, dict) else ssl_object.getpeercert()
    except ssl.SSLError as e:
        raise PeerVerificationError(f"peer certificate cannot be parsed: {e}") from e
    if cert is None:
        raise PeerVerificationError("peer presented no certificate")
    if not cert:
        raise PeerVerificationError(
            "peer certificate was not verified (the TLS context must require peer certificates)"
        )
    sans = cert.get("subjectAltName")
    if not sans:
        raise PeerVerificationError("peer certificate has no subjectAltName")
    uris = [value for kind, value in _pairs(sans) if kind == "URI"]
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    if len(spiffe) != 1:
        raise PeerVerificationError(
            f"peer certificate must carry exactly one SPIFFE URI SAN, it has {len(spiffe)}"
            + (f": {', '.join(spiffe)}" if spiffe else "")
        )
    if len(uris) != 1:
        # An X.509-SVID has exactly one URI SAN (SPIFFE X509-SVID 2): a second URI could
        # be read as the identity by another verifier.
        raise PeerVerificationError(
            f"peer certificate carries {len(uris)} URI SANs; an X.509-SVID has exactly one"
        )
    try:
        return SpiffeId.parse(spiffe[0])
    except IdentityError as e:
        raise PeerVerificationError(f"peer certificate identity is invalid: {e}") from e


def peer_not_after(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> float | None:
    """When the peer's verified leaf certificate expires (Unix time), or None if unknown."""
    try:
        cert = ssl_object.getpeercert()
    except ssl.SSLError:
        return None
    text = cert.get("notAfter") if cert else None
    if not isinstance(text, str):
        return None
    try:
        return float(ssl.cert_time_to_seconds(text))
    except ValueError:
        return None


def _pairs(sans: object) -> list[tuple[str, str]]:
    """subjectAltName as (type, value) pairs, e.g. ("URI", "spiffe://..."), ("DNS", ...)."""
    pairs: list[tuple[str, str]] = []
    for entry in sans if isinstance(sans, tuple) else ():
        if isinstance(entry, tuple) and len(entry) == 2:
            kind, value = entry
            if isinstance(kind, str) and isinstance(value, str):
                pairs.append((kind, value))
    return pairs


def hbone_peer(ssl_object: ssl.SSLObject | ssl.SSLSocket, peercert: object = None) -> SpiffeId:
    """The peer's identity on an HBONE connection, which must have negotiated ALPN h2
    (OpenSSL completes a handshake without ALPN when the peer offers none)."""
    if ssl_object.selected_alpn_protocol() != ALPN_H2:
        raise PeerVerificationError("peer did not negotiate ALPN h2")
    return peer_identity(ssl_object, peercert)


def verify_server(peer: SpiffeId, expected: frozenset[SpiffeId]) -> None:
    """Client side: the server must be one of the identities the destination may have."""
    if peer not in expected:
        want = ", ".join(sorted(str(i) for i in expected)) or "(none)"
        raise PeerVerificationError(f"server identity {peer} is not one of the expected: {want}")


def verify_client(peer: SpiffeId, trust_domain: str) -> None:
    """Server side: the client must belong to our trust domain."""
    if peer.trust_domain != trust_domain:
        raise PeerVerificationError(
            f"client identity {peer} is in trust domain {peer.trust_domain!r}, "
            f"expected {trust_domain!r}"
        )


def _configure(ctx: ssl.SSLContext, cert: WorkloadCertificate, remember_chains: bool) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # before verify_mode: a client context refuses otherwise
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    ctx.set_alpn_protocols([ALPN_H2])
    try:
        ctx.load_verify_locations(cadata=cert.roots_pem.decode())
    except (ssl.SSLError, ValueError) as e:
        raise TLSConfigError(f"mesh roots for {cert.identity} cannot be loaded: {e}") from e
    # The chain without its root when OpenSSL can be told to send it as loaded (the peer
    # holds the root; each certificate sent costs it a parse and a check): 110 us less CPU
    # per handshake on each side (`benchmarks/tls_handshake.py`). Without that mode, a
    # chain that stops short of a root is built again from the trust store on every
    # handshake, so the whole chain is loaded instead.
    as_loaded = send_chain_as_loaded(ctx)
    _load_chain(ctx, cert, cert.chain_without_root_pem if as_loaded else cert.presented_chain_pem)
    _restrict_tls13_ciphersuites(ctx)
    if remember_chains:
        remember_verified_chains(ctx)


def _load_chain(ctx: ssl.SSLContext, cert: WorkloadCertificate, chain_pem: bytes) -> None:
    try:
        load_chain_pem(ctx, chain_pem, cert.key_pem)
    except ssl.SSLError as e:
        raise TLSConfigError(f"certificate or key for {cert.identity} cannot be loaded: {e}") from e


def load_chain_pem(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """`ctx.load_cert_chain` from PEM in memory (the key never written to disk where a
    memfd exists); ssl.SSLError when they do not load. Called again, it replaces the pair
    for the handshakes that follow."""
    with _private_file(chain_pem) as chain, _private_file(key_pem) as key:
        ctx.load_cert_chain(chain, key)


@contextmanager
def _private_file(data: bytes) -> Iterator[str]:
    """A path whose contents are `data`, readable only by us, removed on exit."""
    # ssl can only load a certificate chain and key from a path. A memfd has no name in
    # any file system, so the key is never on disk; /proc/self/fd gives OpenSSL a path.
    fd = -1
    if hasattr(os, "memfd_create"):
        try:
            fd = os.memfd_create("mesh-tls", os.MFD_CLOEXEC)
        except OSError:
            fd = -1
    if fd >= 0:
        path = f"/proc/self/fd/{fd}"
        try:
            _write_all(fd, data)
            if os.path.exists(path):
                yield path
                return
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="mesh-tls-") as tmp:  # mkdtemp: mode 0700
        path = os.path.join(tmp, "pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        yield path


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --- TLS 1.3 cipher suites ------------------------------------------------------------
#
# Python's ssl module has no setter for TLS 1.3 cipher suites (set_ciphers only covers
# TLS 1.2 and below), and OPENSSL_CONF would change every context in the process and only
# if set before OpenSSL first initialises. So SSL_CTX_set_ciphersuites is called through
# ctypes on the context's SSL_CTX pointer, which CPython stores right after the object
# header of an SSLContext (Modules/_ssl.c: `PySSLContext { PyObject_HEAD; SSL_CTX *ctx; ...}`,
# unchanged from 3.7 to 3.13). It is guarded so a different build cannot crash the process:
# - only on CPython versions whose layout is known;
# - the function is looked up through the _ssl module itself, so it is the same libssl that
#   module uses (none is found if OpenSSL is linked statically: then we skip);
# - before writing, the pointer must answer SSL_CTX_get_options exactly as ctx.options
#   does (a 64-bit value with many bits set; a wrong pointer would not match);
# - afterwards, ctx.get_ciphers() (public API) must list exactly the two suites.
# If a guard fails before the write, OpenSSL's defaults stay (they add only
# TLS_CHACHA20_POLY1305_SHA256, also an AEAD suite) and a warning is logged once.

_KNOWN_LAYOUT = ((3, 7), (3, 14))
_ciphersuite_warning_logged = False


class _Libssl:
    def __init__(self) -> None:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)
        self.set_ciphersuites = lib.SSL_CTX_set_ciphersuites
        self.set_ciphersuites.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
        self.set_ciphersuites.restype = ctypes.c_int
        self.get_options = lib.SSL_CTX_get_options
        self.get_options.argtypes = (ctypes.c_void_p,)
        self.get_options.restype = ctypes.c_uint64
        # SSL_CTX_set_mode and _get_mode are macros over SSL_CTX_ctrl.
        self.ctrl = lib.SSL_CTX_ctrl
        self.ctrl.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p)
        self.ctrl.restype = ctypes.c_long


def _load_libssl() -> _Libssl | str:
    if sys.implementation.name != "cpython":
        return f"not CPython ({sys.implementation.name})"
    if not _KNOWN_LAYOUT[0] <= sys.version_info[:2] < _KNOWN_LAYOUT[1]:
        return f"SSLContext layout of Python {sys.version_info[:2]} is not known"
    try:
        return _Libssl()
    except (OSError, AttributeError, ImportError) as e:
        return f"libssl functions not reachable through _ssl: {e}"


_libssl = _load_libssl()


def _restrict_tls13_ciphersuites(ctx: ssl.SSLContext) -> bool:
    """Limit TLS 1.3 to the two AES-GCM suites; False (with a warning) if not possible."""
    reason = _libssl if isinstance(_libssl, str) else _set_ciphersuites(_libssl, ctx)
    if not reason:
        return True
    global _ciphersuite_warning_logged
    if not _ciphersuite_warning_logged:
        _ciphersuite_warning_logged = True
        log.warning("TLS 1.3 cipher suites left at OpenSSL defaults", reason=reason)
    return False


def _ssl_ctx(lib: _Libssl, ctx: ssl.SSLContext) -> int | str:
    """The context's SSL_CTX pointer, checked (see above), or why it cannot be used."""
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        return "SSLContext holds no SSL_CTX pointer where expected"
    if lib.get_options(ptr) != int(ctx.options):
        return "SSL_CTX pointer check failed (options differ)"
    return ptr


# OpenSSL's SSL_CTRL_MODE and SSL_MODE_NO_AUTO_CHAIN (ssl.h): send the certificates loaded,
# never a chain built from the trust store.
_SSL_CTRL_MODE = 33
_SSL_MODE_NO_AUTO_CHAIN = 0x8


def send_chain_as_loaded(ctx: ssl.SSLContext) -> bool:
    """Set SSL_MODE_NO_AUTO_CHAIN on the context; False (nothing changed) where the guards
    above fail."""
    if isinstance(_libssl, str):
        return False
    ptr = _ssl_ctx(_libssl, ctx)
    if isinstance(ptr, str):
        return False
    mode = _libssl.ctrl(ptr, _SSL_CTRL_MODE, _SSL_MODE_NO_AUTO_CHAIN, None)
    return bool(mode & _SSL_MODE_NO_AUTO_CHAIN)


def remember_verified_chains(ctx: ssl.SSLContext) -> verifiedchains.VerifiedChains | None:
    """Install `meshcore.verifiedchains` on the context: its cache, or None where the
    guards above fail (then every chain is verified, as by default)."""
    if isinstance(_libssl, str):
        return None
    ptr = _ssl_ctx(_libssl, ctx)
    if isinstance(ptr, str):
        return None
    return verifiedchains.install(ctx, ptr)


def _set_ciphersuites(
    lib: _Libssl, ctx: ssl.SSLContext, suites: tuple[str, ...] = TLS13_CIPHERSUITES
) -> str:
    ptr = _ssl_ctx(lib, ctx)
    if isinstance(ptr, str):
        return ptr
    if lib.set_ciphersuites(ptr, ":".join(suites).encode()) != 1:
        return "SSL_CTX_set_ciphersuites refused the suites"
    got = tuple(c["name"] for c in ctx.get_ciphers() if c.get("protocol") == "TLSv1.3")
    if got != suites:
        # The write went through but the context disagrees: do not hand out this context.
        raise TLSConfigError(f"TLS 1.3 cipher suites are {got}, expected {suites}")
    return ""
