"""`AppSide._eof_behind`: the one look for a FIN right behind an app's small read, on real
socket pairs (no event loop needed: the look is a non-blocking peek)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from meshcore.relay import EOF_PEEK_MISSES, AppSide


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


def peeking(sock: socket.socket) -> AppSide:
    app = AppSide()
    app.peek = sock
    return app


def test_a_fin_behind_the_read_is_seen_and_nothing_is_consumed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, app_end = pair
    app_end.shutdown(socket.SHUT_WR)
    app = peeking(ours)
    assert app._eof_behind()
    assert app.peek is ours  # still looked at: a FIN is no miss
    assert ours.recv(1) == b""  # the FIN is still there for the loop to read


def test_nothing_behind_the_reads_stops_the_looking_after_the_allowed_misses(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    app = peeking(ours)
    for n in range(1, EOF_PEEK_MISSES + 1):
        assert not app._eof_behind()
        assert (app.peek is None) == (n == EOF_PEEK_MISSES)


def test_more_data_behind_the_reads_counts_as_a_miss_and_is_left_unread(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """An app streaming small writes always has bytes waiting: no FIN is right behind, so
    it is not peeked at for ever (one system call per read), and the peek takes nothing."""
    ours, app_end = pair
    app_end.sendall(b"more")
    app = peeking(ours)
    for _ in range(EOF_PEEK_MISSES):
        assert not app._eof_behind()
    assert app.peek is None
    assert ours.recv(16) == b"more"


def test_a_socket_the_loop_has_closed_ends_the_looking_without_an_error() -> None:
    """The loop detaches the socket object when it closes the connection: a late peek
    fails with EBADF, which is not ours to report."""
    sock = socket.socket()
    sock.close()
    app = peeking(sock)
    assert not app._eof_behind()
    assert app.peek is None
