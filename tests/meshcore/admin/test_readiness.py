"""Readiness (15021) on a loopback ephemeral port, fed by an in-test status source (the
tunnel's node is the real one; here the HTTP answer is what is tested)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from meshcore.admin.readiness import ReadinessServer


class StaticStatus:
    def __init__(self) -> None:
        self.doc: dict[str, Any] = {"ready": False, "pods": {"travel/frontend": "pending"}}

    def status(self) -> dict[str, Any]:
        return self.doc


def test_ready_is_200_and_not_ready_is_503_with_the_status_as_json(aio):
    source = StaticStatus()

    async def main() -> list[tuple[int, str, Any]]:
        server = aio.closing(ReadinessServer(source, 0, host="127.0.0.1"))
        await server.start()
        out = []
        url = f"http://127.0.0.1:{server.port}/healthz/ready"
        async with aiohttp.ClientSession() as http:
            for ready in (False, True):
                source.doc = {**source.doc, "ready": ready}
                async with http.get(url) as r:
                    out.append((r.status, r.content_type, json.loads(await r.text())))
            async with http.get(f"http://127.0.0.1:{server.port}/other") as r:
                out.append((r.status, r.content_type, None))
        return out

    got = aio.run(main)
    assert got == [
        (503, "application/json", {"ready": False, "pods": {"travel/frontend": "pending"}}),
        (200, "application/json", {"ready": True, "pods": {"travel/frontend": "pending"}}),
        (404, "text/plain", None),
    ]
