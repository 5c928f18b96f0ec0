"""The small aiohttp servers of the tunnel's node netns (admin, metrics, readiness)."""

from __future__ import annotations

from aiohttp import web


class NodeHttpServer:
    """One aiohttp app on host:port; subclasses say what `app()` serves."""

    def __init__(self, port: int, host: str) -> None:
        self._port = port
        self._host = host
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        raise NotImplementedError

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        # SO_REUSEPORT: an upgraded tunnel can bind beside the old one.
        site = web.TCPSite(self._runner, self._host, self._port, reuse_port=True)
        await site.start()

    @property
    def port(self) -> int:
        """The bound port (useful when started with port 0)."""
        if self._runner is not None:
            for address in self._runner.addresses:
                if isinstance(address, tuple) and len(address) >= 2:
                    return int(address[1])
        return self._port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    stop = close
