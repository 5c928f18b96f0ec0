"""New mTLS handshakes: where a scenario's destination side accepts them, and the client
certificate the load generator presents (`loadgen handshake` makes the attempts).

The mesh scenarios' certificate comes from the cluster's own CA over its unix socket, with
the client node's CA token, exactly as the client node's tunnel gets the client pod's
identity (the CA issues it because that node runs the client pod); the server's policy
therefore sees the same identity as for the app's real traffic. The files are written to a
private directory (0700, key 0600) that the scenario removes when it stops.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from datetime import timedelta
from pathlib import Path

from meshcore.identity.certs import LocalCAClient, build_certificate, new_key_and_csr
from meshcore.identity.spiffe import SpiffeId

from .scenario import ClientTls

CERT_TTL = timedelta(hours=2)  # longer than any benchmark run


def private_dir(workdir: Path, prefix: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))  # mode 0700


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def mint_from_ca(
    ca_socket: Path, token_path: Path, identity: SpiffeId, directory: Path
) -> ClientTls:
    """A key and a certificate for `identity` from the cluster's CA, written to `directory`
    (the chain is checked against the key and identity before it is used)."""
    key_pem, csr_pem = new_key_and_csr(identity)
    token = token_path.read_text(encoding="utf-8").strip()
    chain = asyncio.run(LocalCAClient(ca_socket, token).sign(csr_pem, CERT_TTL))
    cert = build_certificate(identity, key_pem, chain)
    files = ClientTls(directory / "cert.pem", directory / "key.pem", directory / "roots.pem")
    _write(files.key, cert.key_pem, 0o600)
    # As the source tunnel presents it (meshcore.tls): the leaf and intermediates; the
    # generator's context sends them as loaded (loadgen.handshake_context).
    _write(files.cert, cert.chain_without_root_pem, 0o644)
    _write(files.roots, cert.roots_pem, 0o644)
    return files
