"""What the TLS library itself costs per mutual-TLS handshake, each side apart, with the
mesh's own contexts (`meshcore.tls`: TLS 1.3, P-256 certificates from the project's CA,
client certificates required). No network, no event loop, no root: the two ends talk through
memory BIOs in one thread, and each side's `do_handshake` calls are timed on the process's
CPU clock. What it leaves out (sockets, the event loop's TLS transport, HTTP/2, the CONNECT)
is what `mesh_bench`'s handshake row adds on top.

Variants, so the parts show, each unlike `mesh` in one respect: `mesh` (as the tunnels
run: each side sends its leaf and any intermediates, exactly as loaded, never the root the
peer holds already, and remembers a peer chain it has verified: after the first handshake
the same chain is not verified again, `meshcore.verifiedchains`), `verify-every-time`
(every chain verified in full, as OpenSSL does by default), `whole-chain`
(each side sends its root too, as the tunnels did before: one more certificate for the
peer to parse and check), `no-client-verify` (the
server does not check the client's chain), `no-verify` (neither side checks the other's
chain; the signatures of the handshake itself are still made and checked). The library is
the same one a sidecar like HAProxy links on this machine, so this is the floor neither
proxy goes below.

    .venv/bin/python benchmarks/tls_handshake.py [--handshakes 500] [--rounds 3] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

from meshcore import tls  # noqa: E402
from meshcore.identity.certs import CertificateManager, WorkloadCertificate  # noqa: E402
from meshcore.identity.spiffe import SpiffeId  # noqa: E402
from tests.support.certs import InProcessCA, SendsRoot  # noqa: E402

CLIENT = SpiffeId.parse("spiffe://cluster.local/ns/bench/sa/client")
SERVER = SpiffeId.parse("spiffe://cluster.local/ns/bench/sa/server")
# A handshake that has not finished after this many exchanges is broken, not slow.
MAX_LEGS = 16


@dataclass(frozen=True, slots=True)
class SideCosts:
    """CPU microseconds per handshake, each side's `do_handshake` calls only."""

    client_us: float
    server_us: float


Variant = Callable[[ssl.SSLContext, ssl.SSLContext], None]


def _as_run(client: ssl.SSLContext, server: ssl.SSLContext) -> None:
    pass


def _no_client_verify(client: ssl.SSLContext, server: ssl.SSLContext) -> None:
    server.verify_mode = ssl.CERT_NONE


def _no_verify(client: ssl.SSLContext, server: ssl.SSLContext) -> None:
    server.verify_mode = ssl.CERT_NONE
    client.verify_mode = ssl.CERT_NONE


# name -> (what the contexts are changed by, whether each side sends its root too, whether
# verified chains are remembered)
VARIANTS: dict[str, tuple[Variant, bool, bool]] = {
    "mesh": (_as_run, False, True),
    "verify-every-time": (_as_run, False, False),
    "whole-chain": (_as_run, True, True),
    "no-client-verify": (_no_client_verify, False, True),
    "no-verify": (_no_verify, False, True),
}


def _step(end: ssl.SSLObject, out: ssl.MemoryBIO, to_peer: ssl.MemoryBIO) -> tuple[bool, float]:
    """One `do_handshake` call of one side: (done, its CPU seconds); what it wrote goes to
    the peer's incoming BIO."""
    t = time.process_time()
    try:
        end.do_handshake()
        done = True
    except ssl.SSLWantReadError:
        done = False
    spent = time.process_time() - t
    to_peer.write(out.read())
    return done, spent


def handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> tuple[float, float]:
    """One full handshake over memory BIOs; each side's CPU seconds in `do_handshake`.
    Raises ssl.SSLError if it fails and RuntimeError if it does not finish."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c_done = s_done = False
    tc = ts = 0.0
    for _ in range(MAX_LEGS):
        if not c_done:
            c_done, spent = _step(c, c_out, s_in)
            tc += spent
        if not s_done:
            s_done, spent = _step(s, s_out, c_in)
            ts += spent
        if c_done and s_done:
            return tc, ts
    raise RuntimeError(f"no handshake after {MAX_LEGS} exchanges")


def measure(
    client_cert: WorkloadCertificate,
    server_cert: WorkloadCertificate,
    variant: Variant,
    n: int,
    whole_chain: bool = False,
    remember: bool = True,
) -> SideCosts:
    if whole_chain:
        client_cert = cast(WorkloadCertificate, SendsRoot(client_cert))
        server_cert = cast(WorkloadCertificate, SendsRoot(server_cert))
    client = tls.client_context(client_cert, remember_chains=remember)
    server = tls.server_context(server_cert, remember_chains=remember)
    variant(client, server)
    tc = ts = 0.0
    for _ in range(n):
        c, s = handshake(client, server)
        tc += c
        ts += s
    return SideCosts(tc / n * 1e6, ts / n * 1e6)


async def certificates() -> tuple[WorkloadCertificate, WorkloadCertificate]:
    certs = CertificateManager(InProcessCA())
    try:
        return await certs.get(CLIENT), await certs.get(SERVER)
    finally:
        await certs.close()


def run(handshakes: int, rounds: int) -> dict[str, dict[str, object]]:
    """Every variant in each round (interleaved); per variant the rounds and their medians."""
    client_cert, server_cert = asyncio.run(certificates())
    per: dict[str, list[SideCosts]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name, (variant, whole_chain, remember) in VARIANTS.items():
            per[name].append(
                measure(client_cert, server_cert, variant, handshakes, whole_chain, remember)
            )
    return {
        name: {
            "client_us": statistics.median(r.client_us for r in runs),
            "server_us": statistics.median(r.server_us for r in runs),
            "rounds": [[round(r.client_us), round(r.server_us)] for r in runs],
        }
        for name, runs in per.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--handshakes", type=int, default=500, help="per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the figures here")
    a = ap.parse_args()
    if not 1 <= a.handshakes <= 20_000 or not 1 <= a.rounds <= 20:
        ap.error("--handshakes 1..20000, --rounds 1..20")
    got = run(a.handshakes, a.rounds)
    print(ssl.OPENSSL_VERSION)
    print(f"{'variant':<18}{'client us':>11}{'server us':>11}   rounds (client/server)")
    for name, row in got.items():
        rounds = ", ".join(f"{c}/{s}" for c, s in row["rounds"])  # type: ignore[attr-defined]
        print(f"{name:<18}{row['client_us']:>11.0f}{row['server_us']:>11.0f}   {rounds}")
    if a.json is not None:
        doc = {"openssl": ssl.OPENSSL_VERSION, "handshakes": a.handshakes, "variants": got}
        a.json.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
