"""Readiness on 15021 (`/healthz/ready`), in the tunnel's own network namespace: ready only
when the mesh config is loaded and every enrolled pod has its certificate and listeners."""

from __future__ import annotations

import json

from aiohttp import web

from ztunnel.httpserver import NodeHttpServer
from ztunnel.node import NodeProxy


class ReadinessServer(NodeHttpServer):
    def __init__(self, node: NodeProxy, port: int, host: str = "0.0.0.0") -> None:
        super().__init__(port, host)
        self._node = node

    async def _ready(self, _request: web.Request) -> web.Response:
        status = self._node.status()
        return web.Response(
            status=200 if status["ready"] else 503,
            text=json.dumps(status),
            content_type="application/json",
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz/ready", self._ready)
        return app
