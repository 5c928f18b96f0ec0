"""A token from a file (a pod's projected service-account token, which the kubelet renews
in place) is read again as it changes; a file that cannot be read keeps the last token.

Here, not under tests/kube: that directory's name puts its tests in the API-server tier."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

import kube.client
from kube.client import KubeClient, KubeConfig


async def _echo_auth(request: web.Request) -> web.Response:
    return web.json_response({"auth": request.headers.get("Authorization", "")})


def test_a_token_file_is_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    monkeypatch.setattr(kube.client, "TOKEN_REREAD_S", 0.0)

    async def main() -> list[str]:
        app = web.Application()
        app.router.add_get("/echo", _echo_auth)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        seen = []
        try:
            config = KubeConfig(f"http://127.0.0.1:{port}", token="first", token_file=str(token))
            async with KubeClient(config) as client:
                seen.append((await client.request("GET", "/echo"))["auth"])
                token.write_text("second\n")
                seen.append((await client.request("GET", "/echo"))["auth"])
                token.unlink()
                seen.append((await client.request("GET", "/echo"))["auth"])
        finally:
            await runner.cleanup()
        return seen

    assert asyncio.run(main()) == ["Bearer first", "Bearer second", "Bearer second"]


def test_a_fixed_token_is_sent_as_given() -> None:
    config = KubeConfig("http://127.0.0.1:1", token="fixed")
    assert KubeClient(config)._auth() == {"Authorization": "Bearer fixed"}
    assert KubeClient(KubeConfig("http://127.0.0.1:1"))._auth() == {}
