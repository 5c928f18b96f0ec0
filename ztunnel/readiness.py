"""Readiness on 15021 (`/healthz/ready`), in the tunnel's own network namespace: ready only
when the mesh config is loaded and every enrolled pod has its certificate and listeners."""

from __future__ import annotations

import json

from aiohttp import web

from ztunnel.node import NodeProxy


class ReadinessServer:
    def __init__(self, node: NodeProxy, port: int, host: str = "0.0.0.0") -> None:
        self._node = node
        self._port = port
        self._host = host
        self._runner: web.AppRunner | None = None

    async def _ready(self, _request: web.Request) -> web.Response:
        status = self._node.status()
        return web.Response(
            status=200 if status["ready"] else 503,
            text=json.dumps(status),
            content_type="application/json",
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz/ready", self._ready)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_port=True)
        await site.start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
