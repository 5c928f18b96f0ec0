"""Clock skew on a real TLS 1.3 handshake on loopback: a CA whose clock runs ahead of ours.

The CA back-dates notBefore by CLOCK_SKEW, so a certificate it issues while its clock is up
to that far ahead is already valid for a peer with our clock; further ahead, the peer's
OpenSSL refuses it ("not yet valid"), and the tunnel refuses to take it in the first place
(`lifetime.issued_problem`). The CA's clock is its `now` argument: the machine's is untouched.
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta

from controlplane.ca import CLOCK_SKEW, CertificateAuthority
from meshcore.identity.certs import WorkloadCertificate, build_certificate, new_key_and_csr
from meshcore.identity.lifetime import MAX_CLOCK_SKEW, issued_problem
from meshcore.identity.spiffe import SpiffeId
from meshcore.tls import client_context, server_context
from tests.meshcore.test_tls import connect_and_read, serve_once

TD = "cluster.local"
SERVER = SpiffeId(TD, "shop", "server")
CLIENT = SpiffeId(TD, "shop", "client")


def issued_at(
    ca: CertificateAuthority, identity: SpiffeId, ca_now: datetime
) -> WorkloadCertificate:
    key_pem, csr_pem = new_key_and_csr(identity)
    chain = ca.sign_csr(csr_pem, identity, timedelta(minutes=10), now=ca_now)
    return build_certificate(identity, key_pem, chain)


def handshake(server: WorkloadCertificate, client: WorkloadCertificate) -> object:
    port, thread, _result = serve_once(server_context(server))
    tconn, outcome = connect_and_read(client_context(client), port)
    thread.join(10)
    if tconn is not None:
        tconn.close()
    return outcome


def test_a_ca_clock_ahead_within_the_backdating_still_handshakes():
    ca = CertificateAuthority.create(TD)
    now = datetime.now(UTC)
    ahead = CLOCK_SKEW - timedelta(seconds=30)
    server = issued_at(ca, SERVER, now + ahead)
    assert server.not_before > now - CLOCK_SKEW  # issued by the CA's later clock
    assert issued_problem(server.not_before, server.not_after, now) is None
    assert handshake(server, issued_at(ca, CLIENT, now)) == b"ok"


def test_a_ca_clock_ahead_beyond_the_bound_is_refused_by_peer_and_tunnel():
    ca = CertificateAuthority.create(TD)
    now = datetime.now(UTC)
    server = issued_at(ca, SERVER, now + CLOCK_SKEW + MAX_CLOCK_SKEW + timedelta(seconds=30))
    # The tunnel would never take it: the reason names the skew.
    problem = issued_problem(server.not_before, server.not_after, now)
    assert problem is not None and "clock skew tolerated" in problem
    # And a peer with our clock refuses it in the handshake (what presenting it would do).
    outcome = handshake(server, issued_at(ca, CLIENT, now))
    assert isinstance(outcome, ssl.SSLCertVerificationError)
    assert "not yet valid" in str(outcome)
