"""The chaos benchmark's server app, run inside a pod: port 9000 echoes every byte back
(the L4 path), port 8080 answers HTTP/1.1 with keep-alive, echoing the request body (the
L7 path, through the waypoint). Runs until signalled; each connection's loop ends when its
peer closes. Both listen in every server pod: the Service decides which one is used."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 65536


def echo(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer went away (a crash under test): nothing to answer


def serve_echo(port: int) -> None:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(512)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The head and the body are two writes: without TCP_NODELAY the body waits for the
    # client's delayed ACK (40 ms) on every request.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would flood the pod's log under load

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if not 0 <= length <= MAX_BODY:
            self.send_error(413)
            return
        body = self.rfile.read(length)
        self.send_response(200)
        self.send_header("content-type", "application/octet-stream")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512


def main() -> None:
    threading.Thread(target=serve_echo, args=(9000,), daemon=True).start()
    Server(("0.0.0.0", 8080), Handler).serve_forever()


if __name__ == "__main__":
    main()
