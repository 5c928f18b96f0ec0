"""Remembered peer chains (meshcore.verifiedchains): the window arithmetic on its own, and
real TLS 1.3 handshakes over memory BIOs between the mesh's own contexts, where OpenSSL
calls the remembering verifier for every peer chain."""

from __future__ import annotations

import gc
import ssl
import time
from datetime import timedelta

import pytest
from cryptography import x509

from controlplane.ca import CertificateAuthority
from meshcore import tls, verifiedchains
from meshcore.identity.certs import WorkloadCertificate
from meshcore.identity.spiffe import SpiffeId
from meshcore.verifiedchains import MARGIN_S, VerifiedChains
from tests.support.certs import issue

TD = "cluster.local"
SERVER_ID = SpiffeId(TD, "shop", "server")
CLIENT_ID = SpiffeId(TD, "shop", "client")

pytestmark = pytest.mark.skipif(
    verifiedchains.unavailable() is not None or isinstance(tls._libssl, str),
    reason=f"chains cannot be remembered here: {verifiedchains.unavailable()}",
)


# ---- the windows ---------------------------------------------------------------------


def test_a_chain_holds_only_inside_its_window_and_is_forgotten_outside() -> None:
    chains = VerifiedChains()
    assert not chains.holds(b"k", 100.0)  # never verified
    chains.remember(b"k", 50.0, 200.0)
    assert chains.holds(b"k", 100.0)
    assert chains.holds(b"k", 50.0)
    assert not chains.holds(b"k", 200.0 - MARGIN_S)  # too close to its end
    assert len(chains) == 0  # forgotten: the next handshake verifies afresh
    chains.remember(b"k", 50.0, 200.0)
    assert not chains.holds(b"k", 49.0)  # the clock went back before its start
    assert len(chains) == 0
    assert (chains.hits, chains.misses) == (2, 3)


def test_a_window_too_short_to_use_is_not_kept() -> None:
    chains = VerifiedChains()
    chains.remember(b"k", 100.0, 100.0 + MARGIN_S)
    assert len(chains) == 0


def test_the_least_recently_used_chain_goes_first_when_full() -> None:
    chains = VerifiedChains(capacity=2)
    chains.remember(b"a", 0.0, 100.0)
    chains.remember(b"b", 0.0, 100.0)
    assert chains.holds(b"a", 1.0)  # a is now the most recent
    chains.remember(b"c", 0.0, 100.0)
    assert chains.holds(b"a", 1.0) and chains.holds(b"c", 1.0)
    assert not chains.holds(b"b", 1.0)


# ---- in OpenSSL ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh_ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


@pytest.fixture(scope="module")
def server_cert(mesh_ca: CertificateAuthority) -> WorkloadCertificate:
    return issue(mesh_ca, SERVER_ID)


def handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> tuple[SpiffeId, SpiffeId]:
    """One full handshake over memory BIOs; the identity each side verified of the other.
    Raises ssl.SSLError when either side refuses."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(8):
        for i, (end, out, peer_in) in enumerate(((c, c_out, s_in), (s, s_out, c_in))):
            if done[i]:
                continue
            try:
                end.do_handshake()
                done[i] = True
            except ssl.SSLWantReadError:
                pass
            finally:
                peer_in.write(out.read())
        if all(done):
            return tls.peer_identity(s), tls.peer_identity(c)
    raise AssertionError("the handshake did not finish")


def contexts(
    client_cert: WorkloadCertificate, server_cert: WorkloadCertificate
) -> tuple[ssl.SSLContext, ssl.SSLContext, VerifiedChains, VerifiedChains]:
    before = set(verifiedchains._caches)
    client, server = tls.client_context(client_cert), tls.server_context(server_cert)
    new = [verifiedchains._caches[k] for k in sorted(set(verifiedchains._caches) - before)]
    assert len(new) == 2, "each context remembers its own chains"
    return client, server, new[0], new[1]


def test_a_peer_that_comes_back_with_the_same_chain_is_not_verified_again(
    mesh_ca: CertificateAuthority, server_cert: WorkloadCertificate
) -> None:
    client, server, client_side, server_side = contexts(issue(mesh_ca, CLIENT_ID), server_cert)
    assert handshake(client, server) == (CLIENT_ID, SERVER_ID)
    assert (server_side.hits, server_side.misses, len(server_side)) == (0, 1, 1)
    assert (client_side.hits, client_side.misses, len(client_side)) == (0, 1, 1)
    for _ in range(3):
        assert handshake(client, server) == (CLIENT_ID, SERVER_ID)
    assert (server_side.hits, server_side.misses) == (3, 1)
    assert (client_side.hits, client_side.misses) == (3, 1)
    # Another certificate of the same identity is another chain: verified, then remembered.
    other_client = tls.client_context(issue(mesh_ca, CLIENT_ID))
    assert handshake(other_client, server) == (CLIENT_ID, SERVER_ID)
    assert (server_side.misses, len(server_side)) == (2, 2)


def test_the_window_is_the_chain_s_validity_root_included(
    mesh_ca: CertificateAuthority, server_cert: WorkloadCertificate
) -> None:
    client_cert = issue(mesh_ca, CLIENT_ID, ttl=timedelta(minutes=7))
    client, server, _, server_side = contexts(client_cert, server_cert)
    handshake(client, server)
    ((start, end),) = server_side._windows.values()
    leaf = x509.load_pem_x509_certificate(client_cert.chain_without_root_pem)
    root = mesh_ca.root_cert
    want_start = max(leaf.not_valid_before_utc, root.not_valid_before_utc).timestamp()
    want_end = min(leaf.not_valid_after_utc, root.not_valid_after_utc).timestamp()
    assert abs(start - want_start) <= 1.0
    assert abs(end - want_end) <= 1.0


def test_an_expired_chain_is_refused_though_it_was_remembered(
    mesh_ca: CertificateAuthority, server_cert: WorkloadCertificate
) -> None:
    client_cert = issue(mesh_ca, CLIENT_ID, ttl=timedelta(seconds=4))
    client, server, _, server_side = contexts(client_cert, server_cert)
    handshake(client, server)
    handshake(client, server)
    assert server_side.hits == 1  # remembered while valid
    ((_, end),) = server_side._windows.values()
    time.sleep(max(0.0, end - time.time()) + 1.1)
    with pytest.raises(ssl.SSLError, match="certificate"):
        handshake(client, server)
    assert len(server_side) == 0


def test_a_chain_from_another_ca_is_refused_every_time_and_never_remembered(
    mesh_ca: CertificateAuthority, server_cert: WorkloadCertificate
) -> None:
    client, server, _, server_side = contexts(issue(mesh_ca, CLIENT_ID), server_cert)
    handshake(client, server)  # a good chain is remembered first
    # Same identity, same trust domain, another CA the server does not trust; the client
    # trusts our server (its roots are ours) so only the server's check can refuse it.
    stranger = issue(CertificateAuthority.create(TD), CLIENT_ID)
    stranger_ctx = tls.client_context(stranger)
    stranger_ctx.load_verify_locations(cadata=mesh_ca.roots_pem().decode())
    for _ in range(2):
        with pytest.raises(ssl.SSLError):
            handshake(stranger_ctx, server)
    assert len(server_side) == 1  # only the good chain
    assert handshake(client, server)[0] == CLIENT_ID


def test_an_error_in_the_remembering_verifier_refuses_the_chain(
    mesh_ca: CertificateAuthority, server_cert: WorkloadCertificate, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, server, _, _ = contexts(issue(mesh_ca, CLIENT_ID), server_cert)

    def broken(store_ctx: int, arg: int | None) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(verifiedchains, "_decide", broken)
    with pytest.raises(ssl.SSLError, match="certificate verify failed"):
        handshake(client, server)


def test_without_remembering_every_chain_is_verified_and_the_cache_ends_with_its_context(
    mesh_ca: CertificateAuthority, server_cert: WorkloadCertificate
) -> None:
    # Only additions are compared: a collection may end other tests' contexts meanwhile.
    before = set(verifiedchains._caches)
    client = tls.client_context(issue(mesh_ca, CLIENT_ID), remember_chains=False)
    server = tls.server_context(server_cert, remember_chains=False)
    assert not set(verifiedchains._caches) - before
    assert handshake(client, server) == (CLIENT_ID, SERVER_ID)
    before = set(verifiedchains._caches)
    remembering = tls.server_context(server_cert)
    (mine,) = set(verifiedchains._caches) - before
    del remembering
    gc.collect()
    assert mine not in verifiedchains._caches
