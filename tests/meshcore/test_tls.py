"""Real TLS 1.3 handshakes on loopback between contexts built from mesh certificates.

The cross-trust-domain case uses a second CA (trust domain other.example) whose root the
server also trusts, as during a trust-domain migration or federation: the handshake must
pass (the chain is valid) and only `verify_client` may reject the peer. Our CA refuses to
sign identities outside its own trust domain, so "the same CA signing another trust
domain" cannot happen by design.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import socket
import ssl
import tempfile
import threading
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.ca import CA_KEY_USAGE, CertificateAuthority
from meshcore import tls
from meshcore.identity.certs import WorkloadCertificate
from meshcore.identity.spiffe import SpiffeId
from meshcore.tls import (
    TLS13_CIPHERSUITES,
    PeerVerificationError,
    client_context,
    peer_identity,
    server_context,
    verify_client,
    verify_server,
)
from tests.support.certs import SendsRoot, issue
from tests.support.fds import open_fds

TD = "cluster.local"
SERVER_ID = SpiffeId(TD, "shop", "server")
CLIENT_ID = SpiffeId(TD, "shop", "client")
FOREIGN_ID = SpiffeId("other.example", "shop", "client")


@pytest.fixture(scope="module")
def mesh_ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


@pytest.fixture(scope="module")
def server_cert(mesh_ca) -> WorkloadCertificate:
    return issue(mesh_ca, SERVER_ID)


@pytest.fixture(scope="module")
def client_cert(mesh_ca) -> WorkloadCertificate:
    return issue(mesh_ca, CLIENT_ID)


@dataclasses.dataclass
class ServerResult:
    peer: SpiffeId | None = None
    alpn: str | None = None
    version: str | None = None
    cipher: str | None = None
    error: BaseException | None = None


def serve_once(ctx: ssl.SSLContext) -> tuple[int, threading.Thread, ServerResult]:
    """A loopback TLS server for one connection, in a thread with blocking sockets."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    result = ServerResult()

    def run() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with ctx.wrap_socket(conn, server_side=True) as tconn:
                result.peer = peer_identity(tconn)
                result.alpn = tconn.selected_alpn_protocol()
                result.version = tconn.version()
                result.cipher = (tconn.cipher() or ("",))[0]
                tconn.sendall(b"ok")
                tconn.recv(1)  # wait for the client to finish before closing
        except BaseException as e:
            result.error = e
        finally:
            listener.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return port, thread, result


def connect_and_read(ctx: ssl.SSLContext, port: int) -> tuple[ssl.SSLSocket | None, object]:
    """The client side: the data it read, or the error that stopped it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        tconn = ctx.wrap_socket(sock, server_hostname=None)
        data = tconn.recv(2)
        return tconn, data
    except (ssl.SSLError, OSError) as e:
        sock.close()
        return None, e


def test_contexts_have_the_mesh_settings(server_cert, client_cert):
    for ctx in (server_context(server_cert), client_context(client_cert)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert not ctx.check_hostname
        assert ctx.options & ssl.OP_NO_TICKET
        suites = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"]
        assert tuple(suites) == TLS13_CIPHERSUITES
        # Only the mesh root is trusted, nothing from the system store.
        assert ctx.cert_store_stats()["x509_ca"] == 1
    assert server_context(server_cert).num_tickets == 0


def test_building_contexts_leaks_no_file_descriptors(server_cert):
    before = open_fds()
    for _ in range(20):
        server_context(server_cert)
    assert open_fds() <= before


def test_private_file_fallback_removes_the_key(monkeypatch, tmp_path, server_cert):
    # Without memfd the chain and key go through a private temp dir that is removed after.
    monkeypatch.delattr(os, "memfd_create")
    made: list[str] = []
    real = tempfile.TemporaryDirectory

    def spy(prefix: str | None = None) -> tempfile.TemporaryDirectory[str]:
        td = real(prefix=prefix, dir=tmp_path)
        made.append(td.name)
        assert os.stat(td.name).st_mode & 0o777 == 0o700
        return td

    monkeypatch.setattr(tempfile, "TemporaryDirectory", spy)
    ctx = server_context(server_cert)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert len(made) == 2  # chain and key
    assert list(tmp_path.iterdir()) == []


def test_mutual_tls_handshake_asyncio(aio, server_cert, client_cert):
    async def main() -> None:
        seen: dict[str, object] = {}

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            obj = writer.get_extra_info("ssl_object")
            seen["peer"] = peer_identity(obj)
            seen["alpn"] = obj.selected_alpn_protocol()
            seen["version"] = obj.version()
            writer.write(b"hi")
            await writer.drain()
            await reader.read()  # until the client closes
            writer.close()

        server = aio.closing(
            await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context(server_cert))
        )
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(client_cert), server_hostname=""
        )
        aio.closing(writer)
        assert await reader.readexactly(2) == b"hi"
        obj = writer.get_extra_info("ssl_object")
        assert peer_identity(obj) == SERVER_ID
        verify_server(peer_identity(obj), frozenset({SERVER_ID}))
        assert obj.selected_alpn_protocol() == "h2"
        assert obj.version() == "TLSv1.3"
        assert obj.cipher()[0] in TLS13_CIPHERSUITES
        assert not obj.session.has_ticket  # no resumption possible
        assert seen == {"peer": CLIENT_ID, "alpn": "h2", "version": "TLSv1.3"}
        verify_client(CLIENT_ID, TD)

    aio.run(main)


def test_mutual_tls_handshake_blocking(server_cert, client_cert):
    port, thread, result = serve_once(server_context(server_cert))
    tconn, data = connect_and_read(client_context(client_cert), port)
    assert data == b"ok"
    assert tconn is not None
    assert peer_identity(tconn) == SERVER_ID
    tconn.close()
    thread.join(10)
    assert result.error is None
    assert result.peer == CLIENT_ID
    assert result.alpn == "h2"
    assert result.version == "TLSv1.3"
    assert result.cipher in TLS13_CIPHERSUITES


def test_client_from_another_ca_fails_the_handshake(server_cert, mesh_ca):
    rogue_ca = CertificateAuthority.create(TD)  # same trust domain, different root
    rogue = issue(rogue_ca, CLIENT_ID)
    # The rogue client even trusts our root, so only the server's check can stop it.
    rogue = dataclasses.replace(rogue, roots_pem=mesh_ca.roots_pem())
    port, thread, result = serve_once(server_context(server_cert))
    tconn, outcome = connect_and_read(client_context(rogue), port)
    thread.join(10)
    assert isinstance(result.error, ssl.SSLError)
    assert "certificate verify failed" in str(result.error)
    assert result.peer is None
    assert outcome != b"ok"
    if tconn is not None:
        tconn.close()


def test_server_from_another_ca_is_refused_by_the_client(client_cert):
    rogue_server = issue(CertificateAuthority.create(TD), SERVER_ID)
    rogue_server = dataclasses.replace(rogue_server, roots_pem=client_cert.roots_pem)
    port, thread, result = serve_once(server_context(rogue_server))
    tconn, outcome = connect_and_read(client_context(client_cert), port)
    thread.join(10)
    assert tconn is None
    assert isinstance(outcome, ssl.SSLCertVerificationError)
    assert result.peer is None


def test_client_without_a_certificate_fails(server_cert):
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.verify_mode = ssl.CERT_NONE
    bare.minimum_version = ssl.TLSVersion.TLSv1_3
    bare.set_alpn_protocols(["h2"])
    port, thread, result = serve_once(server_context(server_cert))
    tconn, outcome = connect_and_read(bare, port)
    thread.join(10)
    assert isinstance(result.error, ssl.SSLError)
    assert "peer did not return a certificate" in str(result.error)
    assert outcome != b"ok"
    if tconn is not None:
        tconn.close()


def test_client_of_another_trust_domain_passes_tls_but_not_verify_client(mesh_ca, server_cert):
    foreign_ca = CertificateAuthority.create("other.example")
    both_roots = mesh_ca.roots_pem() + foreign_ca.roots_pem()
    foreign = dataclasses.replace(issue(foreign_ca, FOREIGN_ID), roots_pem=both_roots)
    server = dataclasses.replace(server_cert, roots_pem=both_roots)
    port, thread, result = serve_once(server_context(server))
    tconn, data = connect_and_read(client_context(foreign), port)
    assert data == b"ok"
    assert tconn is not None
    tconn.close()
    thread.join(10)
    assert result.error is None
    assert result.peer == FOREIGN_ID
    verify_client(SpiffeId(TD, "any", "one"), TD)
    with pytest.raises(PeerVerificationError, match=re.escape("trust domain 'other.example'")):
        verify_client(result.peer, TD)


def test_client_offering_only_chacha20_is_refused(server_cert, client_cert):
    if isinstance(tls._libssl, str):
        pytest.skip(f"TLS 1.3 suites cannot be set here: {tls._libssl}")
    ctx = client_context(client_cert)
    assert tls._set_ciphersuites(tls._libssl, ctx, ("TLS_CHACHA20_POLY1305_SHA256",)) == ""
    port, thread, result = serve_once(server_context(server_cert))
    tconn, outcome = connect_and_read(ctx, port)
    thread.join(10)
    assert tconn is None
    assert isinstance(outcome, ssl.SSLError)
    assert isinstance(result.error, ssl.SSLError)
    assert "no shared cipher" in str(result.error)


def test_verify_server_lists_expected_and_got():
    verify_server(SERVER_ID, frozenset({SERVER_ID, CLIENT_ID}))
    with pytest.raises(PeerVerificationError) as info:
        verify_server(CLIENT_ID, frozenset({SERVER_ID}))
    assert str(CLIENT_ID) in str(info.value)
    assert str(SERVER_ID) in str(info.value)


class FakeSSLObject:
    """A fake SSL object: the only way to see a peer without a certificate, which none of
    the mesh's contexts lets complete a handshake."""

    def getpeercert(self, binary_form: bool = False) -> None:
        return None


def cert_builder(
    subject: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    """A certificate for `subject`, valid from a minute ago for an hour."""
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
    )


def ca_certificate(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    """A CA certificate (a root when `subject` is `issuer` and `signer` its own key)."""
    return (
        cert_builder(subject, public_key)
        .issuer_name(issuer)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .sign(signer, hashes.SHA256())
    )


def workload_certificate(
    identity: SpiffeId,
    key: ec.EllipticCurvePrivateKey,
    chain: list[x509.Certificate],
    root: x509.Certificate,
) -> WorkloadCertificate:
    """`chain` (leaf first) and its key as the tunnel holds them, trusting `root`."""
    pem = serialization.Encoding.PEM
    leaf = chain[0]
    return WorkloadCertificate(
        identity=identity,
        key_pem=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        chain_pem=[c.public_bytes(pem) for c in chain],
        roots_pem=root.public_bytes(pem),
        serial=leaf.serial_number,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
    )


class SanCA:
    """A throwaway CA that issues leaves with any subjectAltName (ours only issues SPIFFE)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "san test root")])
        self.cert = ca_certificate(name, name, self.key.public_key(), self.key)

    def leaf(self, sans: list[x509.GeneralName]) -> WorkloadCertificate:
        key = ec.generate_private_key(ec.SECP256R1())
        # A subject name, so that a leaf without subjectAltName is still a valid certificate.
        subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "san test leaf")])
        builder = cert_builder(subject, key.public_key()).issuer_name(self.cert.subject)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        # SERVER_ID: what the context builder logs; the SANs above are what count.
        return workload_certificate(SERVER_ID, key, [cert, self.cert], self.cert)


@pytest.fixture(scope="module")
def san_ca() -> SanCA:
    return SanCA()


def client_peer_seen_by_server(san_ca: SanCA, sans: list[x509.GeneralName]) -> ServerResult:
    """A real handshake whose client leaf has `sans`; what `peer_identity` said on the server."""
    server = san_ca.leaf([x509.UniformResourceIdentifier(str(SERVER_ID))])
    port, thread, result = serve_once(server_context(server))
    tconn, _ = connect_and_read(client_context(san_ca.leaf(sans)), port)
    if tconn is not None:
        tconn.close()
    thread.join(10)
    return result


@pytest.mark.parametrize(
    ("sans", "message"),
    [
        ([], "no subjectAltName"),
        ([x509.DNSName("a.example")], "exactly one SPIFFE URI SAN, it has 0"),
        (
            [
                x509.UniformResourceIdentifier(str(SERVER_ID)),
                x509.UniformResourceIdentifier(str(CLIENT_ID)),
            ],
            f"it has 2: {SERVER_ID}, {CLIENT_ID}",
        ),
        ([x509.UniformResourceIdentifier("https://x.example")], "it has 0$"),
        ([x509.UniformResourceIdentifier("spiffe://td/x")], "identity is invalid"),
    ],
    ids=["no-san", "dns-only", "two", "non-spiffe-uri", "malformed"],
)
def test_peer_identity_rejects(san_ca, sans, message):
    result = client_peer_seen_by_server(san_ca, sans)
    assert isinstance(result.error, PeerVerificationError), result.error
    assert re.search(message, str(result.error)), str(result.error)
    assert result.peer is None


def test_peer_identity_without_a_certificate():
    with pytest.raises(PeerVerificationError, match="no certificate"):
        peer_identity(FakeSSLObject())  # type: ignore[arg-type]


def test_peer_identity_ignores_names_that_are_not_uris(san_ca):
    result = client_peer_seen_by_server(
        san_ca,
        [
            x509.DNSName("a.example"),
            x509.UniformResourceIdentifier(str(CLIENT_ID)),
            x509.RFC822Name("a@x.example"),
        ],
    )
    assert result.error is None
    assert result.peer == CLIENT_ID


def test_peer_identity_refuses_a_second_uri_beside_the_spiffe_one(san_ca):
    """An X.509-SVID has exactly one URI SAN: another verifier might read the other one."""
    result = client_peer_seen_by_server(
        san_ca,
        [
            x509.UniformResourceIdentifier(str(CLIENT_ID)),
            x509.UniformResourceIdentifier("https://x.example"),
        ],
    )
    assert isinstance(result.error, PeerVerificationError), result.error
    assert "2 URI SANs" in str(result.error)
    assert result.peer is None


def test_peer_identity_refuses_an_unverified_certificate(server_cert, client_cert):
    # A context that does not verify the peer yields an empty certificate dict: the
    # identity in it is unproven, so it must not be read.
    unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    unverified.set_alpn_protocols(["h2"])
    with (
        tls._private_file(client_cert.presented_chain_pem) as chain,
        tls._private_file(client_cert.key_pem) as key,
    ):
        unverified.load_cert_chain(chain, key)
    port, thread, result = serve_once(server_context(server_cert))
    tconn, data = connect_and_read(unverified, port)
    assert data == b"ok"
    assert tconn is not None
    with pytest.raises(PeerVerificationError, match="not verified"):
        peer_identity(tconn)
    tconn.close()
    thread.join(10)
    assert result.peer == CLIENT_ID  # the server did verify the client


# --- the chain a context sends: leaf and intermediates, never the root ---------------------


class ChainCA:
    """A root, an intermediate under it, and SPIFFE leaves under that (as an Istio CA with
    plugged-in certificates issues them)."""

    def __init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        root_name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "chain test root")])
        self.root = ca_certificate(root_name, root_name, self.root_key.public_key(), self.root_key)
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "chain test intermediate")])
        self.intermediate = ca_certificate(name, root_name, self.key.public_key(), self.root_key)

    def leaf(self, identity: SpiffeId, with_root: bool = True) -> WorkloadCertificate:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            cert_builder(x509.Name([]), key.public_key())
            .issuer_name(self.intermediate.subject)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        chain = [cert, self.intermediate, self.root] if with_root else [cert, self.intermediate]
        return workload_certificate(identity, key, chain, self.root)


@pytest.fixture(scope="module")
def chain_ca() -> ChainCA:
    return ChainCA()


def test_the_chain_sent_is_the_leaf_and_intermediates(chain_ca: ChainCA) -> None:
    cert = chain_ca.leaf(SERVER_ID)
    assert cert.chain_without_root_pem == cert.chain_pem[0] + cert.chain_pem[1]
    # A chain that does not end in one of the roots is sent whole.
    short = chain_ca.leaf(SERVER_ID, with_root=False)
    assert short.chain_without_root_pem == short.chain_pem[0] + short.chain_pem[1]


def test_a_peer_that_holds_only_the_root_verifies_a_chain_through_an_intermediate(
    chain_ca: ChainCA,
) -> None:
    """The intermediate is sent (the peer could not build the chain without it), on both
    sides of a real handshake."""
    port, thread, result = serve_once(server_context(chain_ca.leaf(SERVER_ID)))
    tconn, data = connect_and_read(client_context(chain_ca.leaf(CLIENT_ID)), port)
    assert data == b"ok", data
    assert tconn is not None
    assert peer_identity(tconn) == SERVER_ID
    tconn.close()
    thread.join(10)
    assert result.error is None and result.peer == CLIENT_ID


def _server_flight(server: ssl.SSLContext, client: ssl.SSLContext) -> int:
    """Bytes the server writes in a whole handshake over memory BIOs."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    sent = 0
    for _ in range(8):
        for end, out, peer in ((c, c_out, s_in), (s, s_out, c_in)):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
            data = out.read()
            if end is s:
                sent += len(data)
            peer.write(data)
    return sent


def test_the_root_the_peer_holds_is_not_sent(server_cert, client_cert):
    root_der = ssl.PEM_cert_to_DER_cert(server_cert.roots_pem.decode())
    with_root = server_context(SendsRoot(server_cert))  # type: ignore[arg-type]
    ours = _server_flight(server_context(server_cert), client_context(client_cert))
    before = _server_flight(with_root, client_context(client_cert))
    assert before - ours >= len(root_der)
