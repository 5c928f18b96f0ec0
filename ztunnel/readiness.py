"""Readiness on 15021 (`/healthz/ready`), in the tunnel's own network namespace: ready only
when the mesh config is loaded and every enrolled pod has its certificate and listeners."""

from __future__ import annotations

from meshcore.http1.server import NodeHttpServer, Request, Response, Routes
from ztunnel.node import NodeProxy


class ReadinessServer(NodeHttpServer):
    def __init__(self, node: NodeProxy, port: int, host: str = "0.0.0.0") -> None:
        super().__init__(port, host)
        self._node = node

    async def _ready(self, _request: Request) -> Response:
        status = self._node.status()
        return Response.json(status, 200 if status["ready"] else 503)

    def routes(self) -> Routes:
        return {"/healthz/ready": {"GET": self._ready}}
