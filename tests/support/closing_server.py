"""A loopback TCP server that reads one request per connection, sends a fixed answer (maybe
nothing, maybe in pieces with a pause between them, so the client's reads see it cut) and
closes its end first, as a `Connection: close` HTTP/1.1 server does."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Sequence


@contextlib.contextmanager
def closing_server(answer: bytes | Sequence[bytes], pause: float = 0.0) -> Iterator[int]:
    """Serve on 127.0.0.1 until the block ends; yields the port."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(256)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with c:
                c.settimeout(2.0)
                try:
                    c.recv(4096)
                    for i, piece in enumerate([answer] if isinstance(answer, bytes) else answer):
                        if i:
                            time.sleep(pause)
                        c.sendall(piece)
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        srv.close()
