"""The bench's plain relay (benchmarks/apps/relay.py), on loopback: short connections whose
server answers and closes, as mesh_bench's new-connection phase makes them. Each relayed
connection must end with both of its descriptors closed once both directions have ended;
the relay used to leave them open (uvloop does not close a transport whose two halves are
shut), and under that load it died with glibc's "double free or corruption"."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.closing_server import closing_server
from tests.support.fds import open_fds
from tests.support.ports import free_port

RELAY = Path(__file__).resolve().parents[2] / "benchmarks" / "apps" / "relay.py"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
CONNECTIONS = 600
WORKERS = 4


@pytest.fixture
def answering() -> Iterator[int]:
    """A server that answers each request and closes its end first."""
    with closing_server(ANSWER) as port:
        yield port


@pytest.fixture
def relay(answering: int) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(RELAY), "--bind", "127.0.0.1",
         "--forward", f"{port}:127.0.0.1:{answering}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"relay ")
        yield proc, port
    finally:
        proc.kill()
        proc.wait(10)


def test_short_connections_through_the_relay_leave_no_descriptor_open(
    relay: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, port = relay
    before = len(open_fds(proc.pid))
    done = [0] * WORKERS
    failed = [0] * WORKERS
    deadline = time.monotonic() + 60.0

    def work(k: int) -> None:
        for _ in range(CONNECTIONS // WORKERS):
            if time.monotonic() > deadline or proc.poll() is not None:
                return
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    got = b""
                    while chunk := s.recv(4096):
                        got += chunk
                if got == ANSWER:
                    done[k] += 1
                else:
                    failed[k] += 1
            except OSError:
                failed[k] += 1

    threads = [threading.Thread(target=work, args=(k,)) for k in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert proc.poll() is None, proc.stderr.read().decode()[-500:] if proc.stderr else ""
    assert sum(done) == CONNECTIONS and sum(failed) == 0
    # Every relayed connection's two descriptors are closed (a moment for the last ones).
    for _ in range(50):
        if len(open_fds(proc.pid)) <= before + 2:
            break
        time.sleep(0.1)
    assert len(open_fds(proc.pid)) <= before + 2
