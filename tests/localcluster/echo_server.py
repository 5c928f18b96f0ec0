"""A tiny pod app for the netns tests: on each TCP connection, reply "<POD_NAME> <peer ip>"."""

from __future__ import annotations

import os
import socketserver
import sys


class Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        reply = f"{os.environ.get('POD_NAME', '?')} {self.client_address[0]}\n"
        self.request.sendall(reply.encode())


def main() -> None:
    port = int(sys.argv[1])
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer(("0.0.0.0", port), Handler) as srv:
        print(f"listening on {port}", flush=True)
        srv.serve_forever()


if __name__ == "__main__":
    main()
