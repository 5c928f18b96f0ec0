"""`python -m meshcore.identity.certworker`: the child process that makes keys and checks chains.

The tunnel starts it when identities need certificates and closes its stdin when it has
nothing more to ask; it is the only process of the tunnel that imports `cryptography`
(see `meshcore.identity.certcrypto`). It answers requests one at a time, in order, and exits at the
end of its input. `meshcore.identity.certworker_client` is the other end.

Wire format: one JSON object per line, UTF-8, both ways. Every request carries an integer
`id` that its answer repeats.

    {"id": 1, "op": "key_and_csr", "identity": "spiffe://..."}
    -> {"id": 1, "key": "<PKCS#8 PEM>", "public_key": "<SPKI PEM>", "csr": "<CSR PEM>"}
    {"id": 2, "op": "check_chain", "identity": "spiffe://...", "public_key": "<SPKI PEM>",
     "chain": ["<leaf PEM>", ..., "<root PEM>"]}
    -> {"id": 2, "serial": 123, "not_before": "<ISO 8601, UTC>", "not_after": "<ISO 8601>"}
    {"id": 3, "op": "sign_grpc", "address": "host:port", "root_cert": "<path>",
     "token_path": "<path>", "csr": "<CSR PEM>", "ttl_seconds": 86400, "impersonate": true,
     "timeout": 10.0}
    -> {"id": 3, "chain": ["<leaf PEM>", ..., "<root PEM>"]}
       (Istio's CreateCertificate over gRPC; with "impersonate", the CSR's identity is sent
       as metadata ImpersonatedIdentity, as a node proxy asks for its pods' identities.
       grpcio is imported for this operation only.)
    a request that cannot be served -> {"id": n, "error": "<what is wrong>"}

A line that is not a request with an integer id ends the worker (status 2, reason on
stderr): the stream is out of step and nothing after it can be trusted.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import IO, Any

from meshcore.identity.certcrypto import ChainError, check_chain, csr_uri, new_key_and_csr

EXIT_BAD_REQUEST = 2


def answer(request: dict[str, Any]) -> dict[str, Any]:
    """The answer to one request (its `id` included); errors are answers too."""
    rid = request["id"]
    op = request.get("op")
    try:
        if op == "sign_grpc":
            return {"id": rid, "chain": _sign_grpc(request)}
        identity = _text(request, "identity")
        if op == "key_and_csr":
            made = new_key_and_csr(identity)
            return {
                "id": rid,
                "key": made.key_pem.decode(),
                "public_key": made.public_key_pem.decode(),
                "csr": made.csr_pem.decode(),
            }
        if op == "check_chain":
            chain = request.get("chain")
            if not isinstance(chain, list) or not all(isinstance(c, str) for c in chain):
                raise ChainError("request has no chain list")
            facts = check_chain(
                identity, _text(request, "public_key").encode(), [c.encode() for c in chain]
            )
            return {
                "id": rid,
                "serial": facts.serial,
                "not_before": facts.not_before.isoformat(),
                "not_after": facts.not_after.isoformat(),
            }
        raise ChainError(f"unknown operation {op!r}")
    except ChainError as e:
        return {"id": rid, "error": str(e)}
    except Exception as e:  # one bad request must not take down the others in the queue
        return {"id": rid, "error": f"{op} failed: {type(e).__name__}: {e}"}


def serve(lines: IO[bytes], out: IO[bytes], err: IO[str]) -> int:
    for line in lines:
        try:
            request = json.loads(line)
        except ValueError as e:
            print(f"certworker: request is not JSON ({e}): {line[:200]!r}", file=err)
            return EXIT_BAD_REQUEST
        if not isinstance(request, dict) or type(request.get("id")) is not int:
            print(f"certworker: request has no integer id: {line[:200]!r}", file=err)
            return EXIT_BAD_REQUEST
        out.write(json.dumps(answer(request)).encode() + b"\n")
        out.flush()  # the tunnel is waiting for this answer, not for a full buffer
    return 0


def main() -> int:
    # Ctrl-C in a terminal reaches the whole process group; the tunnel decides when this
    # worker ends (by closing stdin), so a traceback here would only be noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = sys.stdout.buffer
    # Only answers may reach the pipe: anything printed by accident goes to stderr, which
    # the tunnel reports, instead of corrupting the answer stream.
    sys.stdout = sys.stderr
    return serve(sys.stdin.buffer, out, sys.stderr)


def _sign_grpc(request: dict[str, Any]) -> list[str]:
    # Imported here: a worker that only makes keys never loads grpcio.
    from meshcore.identity.ca_grpc_call import CaCallError, create_certificate

    csr = _text(request, "csr")
    ttl = request.get("ttl_seconds")
    timeout = request.get("timeout")
    if type(ttl) is not int or not isinstance(timeout, int | float) or isinstance(timeout, bool):
        raise ChainError("sign_grpc needs an integer ttl_seconds and a number timeout")
    impersonated = csr_uri(csr.encode()) if request.get("impersonate") is True else ""
    try:
        return create_certificate(
            _text(request, "address"),
            Path(_text(request, "root_cert")),
            Path(_text(request, "token_path")),
            csr,
            ttl,
            impersonated,
            float(timeout),
        )
    except CaCallError as e:
        raise ChainError(str(e)) from e


def _text(request: dict[str, Any], name: str) -> str:
    value = request.get(name)
    if not isinstance(value, str):
        raise ChainError(f"request has no {name} string")
    return value


if __name__ == "__main__":
    sys.exit(main())
