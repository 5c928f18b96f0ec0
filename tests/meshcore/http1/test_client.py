"""The unix-socket HTTP client (what asks the local CA), against canned answers from a real
unix-socket server in the test, and `LocalCAClient`'s errors when the CA misbehaves (the
real CA server is exercised in tests/controlplane/test_ca_server.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from meshcore.http1.client import ProtocolError, post_unix
from meshcore.http1.parse import parse_request_head
from meshcore.identity import certs
from meshcore.identity.certs import CertificateError, LocalCAClient, new_key_and_csr
from meshcore.identity.spiffe import SpiffeId
from tests.support.aio import run

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def canned(response: bytes) -> Answer:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = await reader.readuntil(b"\r\n\r\n")
        head = parse_request_head(raw[:-4])
        await reader.readexactly(head.content_length)
        writer.write(response)
        await writer.drain()
        writer.close()

    return answer


def serve(path: Path, answer: Answer, scenario: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        server = await asyncio.start_unix_server(answer, str(path))
        try:
            return await scenario()
        finally:
            server.close()
            await server.wait_closed()

    return run(main, limit=30)


@pytest.mark.parametrize(
    "response",
    [
        b'HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{"a": 1}\n',
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4\r\n{"a"\r\n5\r\n: 1}\n\r\n0\r\n\r\n',
        b'HTTP/1.0 200 OK\r\n\r\n{"a": 1}\n',  # ends with the connection
    ],
)
def test_framings_of_an_answer(tmp_path, response):
    sock = tmp_path / "s.sock"
    got = serve(sock, canned(response), lambda: post_unix(str(sock), "/x", b"{}", {}))
    assert got == (200, b'{"a": 1}\n')


def test_the_request_is_a_content_length_post(tmp_path):
    sock = tmp_path / "s.sock"
    seen: list[Any] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = parse_request_head((await reader.readuntil(b"\r\n\r\n"))[:-4])
        seen.append((head, await reader.readexactly(head.content_length)))
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        writer.close()

    got = serve(
        sock,
        answer,
        lambda: post_unix(str(sock), "/v1/x", b"body!", {"Authorization": "Bearer t"}, host="ca"),
    )
    assert got == (201, b"")
    head, body = seen[0]
    assert (head.method, head.path, body) == ("POST", "/v1/x", b"body!")
    assert head.headers["host"] == "ca"
    assert head.headers["authorization"] == "Bearer t"
    assert head.headers["connection"] == "close"


@pytest.mark.parametrize(
    ("response", "says"),
    [
        (b"", "no response"),
        (b"HTTP/1.1 200 OK\r\nContent-", "incomplete response head"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "shorter"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "exceeds"),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 2_000_000, "larger than"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n", "longer than"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "truncated"),
    ],
)
def test_broken_answers_are_protocol_errors(tmp_path, response, says):
    sock = tmp_path / "s.sock"

    async def scenario() -> None:
        with pytest.raises(ProtocolError, match=says):
            await post_unix(str(sock), "/x", b"", {})

    serve(sock, canned(response), scenario)


# -- LocalCAClient ------------------------------------------------------------------------

ALICE = SpiffeId("cluster.local", "shop", "alice")


def sign_with(sock: Path, answer: Answer) -> Any:
    return serve(
        sock,
        answer,
        lambda: LocalCAClient(sock, "t").sign(new_key_and_csr(ALICE)[1], timedelta(hours=1)),
    )


def test_a_ca_that_never_answers_is_an_error_within_the_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(certs, "CA_REQUEST_TIMEOUT", 0.3)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes

    t0 = time.monotonic()
    with pytest.raises(CertificateError, match=r"cannot reach the CA.*no answer within 0.3 s"):
        sign_with(tmp_path / "ca.sock", silent)
    assert time.monotonic() - t0 < 5


def test_a_ca_that_speaks_no_http_is_a_clear_error(tmp_path):
    with pytest.raises(CertificateError, match=r"cannot reach the CA.*malformed status line"):
        sign_with(tmp_path / "ca.sock", canned(b"garbage\r\n\r\n"))


def test_refusals_and_odd_answers_keep_their_messages(tmp_path):
    refused = b'HTTP/1.1 503 x\r\nContent-Length: 17\r\n\r\n{"error": "busy"}'
    with pytest.raises(CertificateError, match=r"CA refused \(503\): busy"):
        sign_with(tmp_path / "a.sock", canned(refused))
    plain = b"HTTP/1.1 500 x\r\nContent-Length: 4\r\n\r\noops"
    with pytest.raises(CertificateError, match=r"CA refused \(500\): oops"):
        sign_with(tmp_path / "b.sock", canned(plain))
    no_chain = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    with pytest.raises(CertificateError, match="no certChain"):
        sign_with(tmp_path / "c.sock", canned(no_chain))
    chain = b'HTTP/1.1 200 OK\r\nContent-Length: 25\r\n\r\n{"certChain": ["a", "b"]}'
    assert sign_with(tmp_path / "d.sock", canned(chain)) == [b"a", b"b"]
