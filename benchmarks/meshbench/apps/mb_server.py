"""The benchmark server, run as a pod's command: HTTP/1.1 on --http-port and the bulk sink.

HTTP: every request (any method and path; a body only by Content-Length) is answered with
200 and a BODY-byte body on the same connection (keep-alive; pipelined requests are
answered in order), or closed after the answer when the request says `Connection: close`.
uvloop Protocols, so thousands of idle connections (the per-connection memory phase) cost
the server little. The bulk sink is benchmarks/apps/l4_server.py's, loaded from its file,
so throughput here means the same as in l4_datapath.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import resource
from pathlib import Path
from types import ModuleType
from typing import cast

import uvloop

BODY = 1024
MAX_HEAD = 16384  # a head longer than this is not one of ours: drop the connection
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n\r\n"
)
L4_SERVER = Path(__file__).resolve().parents[2] / "apps" / "l4_server.py"


def load_l4_server() -> ModuleType:
    spec = importlib.util.spec_from_file_location("l4_server", L4_SERVER)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {L4_SERVER}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Http(asyncio.Protocol):
    __slots__ = ("answer", "buf", "close_after", "need", "transport")

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.buf = bytearray()
        self.close_after = False
        self.need = 0  # body bytes of the current request still to skip
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        t = self.transport
        assert t is not None
        while True:
            if self.need:
                take = min(self.need, len(self.buf))
                del self.buf[:take]
                self.need -= take
                if self.need:
                    return
                t.write(self.answer)
                if self.close_after:
                    t.close()
                    return
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    t.close()
                return
            head = bytes(self.buf[:end]).lower()
            del self.buf[: end + 4]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip() == b"content-length":
                    length = int(value.strip() or b"0")
            self.close_after = b"connection: close" in head
            if length:
                self.need = length
                continue
            t.write(self.answer)
            if self.close_after:
                t.close()
                return


def raise_nofile() -> None:
    # The idle-connection phase holds thousands of sockets open at once.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve_http(port: int) -> None:
    answer = RESPONSE % BODY + b"b" * BODY
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Http(answer), "0.0.0.0", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--sink-port", type=int, required=True)
    args = ap.parse_args()
    raise_nofile()
    l4 = load_l4_server()
    l4.serve(args.sink_port, l4.sink)  # threads; the HTTP loop runs in the main thread
    print(f"serving http :{args.http_port} sink :{args.sink_port}", flush=True)
    uvloop.run(serve_http(args.http_port))


if __name__ == "__main__":
    main()
