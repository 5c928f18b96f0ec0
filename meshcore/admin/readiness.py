"""Readiness on 15021 (`/healthz/ready`), in the proxy's own network namespace.

The server knows nothing about the proxy: it asks a `ReadinessSource` for its status and
answers 200 when that says ready, else 503, with the status as the JSON body.
"""

from __future__ import annotations

from typing import Any, Protocol

from meshcore.http1.server import NodeHttpServer, Request, Response, Routes


class ReadinessSource(Protocol):
    def status(self) -> dict[str, Any]:
        """JSON-able; `ready` (bool) decides the answer."""
        ...


class ReadinessServer(NodeHttpServer):
    def __init__(self, source: ReadinessSource, port: int, host: str = "0.0.0.0") -> None:
        super().__init__(port, host)
        self._source = source

    async def _ready(self, _request: Request) -> Response:
        status = self._source.status()
        return Response.json(status, 200 if status["ready"] else 503)

    def routes(self) -> Routes:
        return {"/healthz/ready": {"GET": self._ready}}
