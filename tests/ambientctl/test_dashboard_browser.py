"""`ambientctl dashboard` in a real headless browser (Debian's Chromium, driven over the
DevTools protocol): on a running local cluster with some traffic the page draws the
expected edges (mTLS client -> service -> workload, a plaintext one from a pod outside the
mesh, client -> waypoint -> service -> workload with requests for a waypoint's service), and
after an AuthorizationPolicy denies the client, new traffic shows the denial on
that edge, and clicking the edge shows its `explain` with the DENIED verdict.

Screenshots are kept under test-artifacts/dashboard/ (or $TEST_ARTIFACTS/dashboard/).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import nsutil
from localcluster import gateways as gw
from localcluster import mesh

pytestmark = [pytest.mark.netns, pytest.mark.slow]

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
CLUSTER_FILE = HERE / "dashboard-cluster.yaml"
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", ROOT / "test-artifacts")) / "dashboard"
START_TIMEOUT = 60.0  # the dashboard's URL, Chromium's DevTools port
WAIT_TIMEOUT = 90.0  # until the page shows what the test waits for (polls every 2 s)
CDP_TIMEOUT = 30.0  # one DevTools command
DENY_CLIENT = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-client", "namespace": "shop"},
    "spec": {
        "selector": {"matchLabels": {"app": "web"}},
        "action": "DENY",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}],
    },
}
CLIENT_EDGE = '.edge[data-source="workload:shop/client"][data-target="service:shop/web"]'
SERVICE_EDGE = '.edge[data-source="service:shop/web"][data-target="workload:shop/web"]'
TO_WAYPOINT = '.edge[data-source="workload:shop/client"][data-target="waypoint:shop/waypoint"]'
FROM_WAYPOINT = '.edge[data-source="waypoint:shop/waypoint"][data-target="service:shop/api"]'
TO_API = '.edge[data-source="service:shop/api"][data-target="workload:shop/api"]'
OUTSIDER_EDGE = '.edge[data-source="workload:plain/outsider"][data-target="workload:shop/web"]'


@pytest.fixture(scope="module")
def cluster() -> Iterator[mesh.Cluster]:
    state_root = tempfile.mkdtemp(prefix="dash-state-")
    try:
        c = mesh.up(CLUSTER_FILE, state_root)
        try:
            _wait_listening(c, "shop", "web-0", 9000)
            _wait_listening(c, "shop", "api-0", 8080)
            # The waypoint the service api is bound to (by its label in the cluster file).
            done = mesh.apply_resources(c, [gw.waypoint_resource("waypoint", "shop")], "test")
            deadline = time.monotonic() + START_TIMEOUT
            while not all(r.ready for _, r in mesh.waypoint_status(c, "shop")):
                assert time.monotonic() < deadline, mesh.waypoint_status(c, "shop")
                time.sleep(0.2)
            assert done.digest is not None
            mesh.wait_config(c, done.digest, START_TIMEOUT)
            yield c
        finally:
            mesh.down(c.spec.name, state_root)
    finally:
        shutil.rmtree(state_root, ignore_errors=True)


def _wait_listening(c: mesh.Cluster, ns: str, pod: str, port: int) -> None:
    """Until the app accepts, asked over the pod's own loopback (no capture there)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with nsutil.socket_at(c.pod_netns(ns, pod)) as s:
            s.settimeout(2)
            try:
                s.connect(("127.0.0.1", port))
                return
            except OSError:
                assert time.monotonic() < deadline, f"{ns}/{pod} never listened on {port}"
        time.sleep(0.1)


def talk(c: mesh.Cluster, ns: str, pod: str, times: int) -> int:
    """`times` echo exchanges from a pod to the web service; how many were answered."""
    vip = str(c.spec.service("shop", "web").vip)
    answered = 0
    for _ in range(times):
        with nsutil.socket_at(c.pod_netns(ns, pod)) as s:
            s.settimeout(10)
            try:
                s.connect((vip, 80))
                f = s.makefile("rb")
                if f.readline():
                    s.sendall(b"ping")
                    s.shutdown(socket.SHUT_WR)
                    answered += f.read() == b"ping"
            except OSError:
                pass  # refused or reset: a denial
    return answered


def requests(c: mesh.Cluster, times: int) -> list[bytes]:
    """`times` HTTP requests from the client to the api service (through its waypoint); the
    status lines answered."""
    vip = str(c.spec.service("shop", "api").vip)
    out = []
    for _ in range(times):
        with nsutil.socket_at(c.pod_netns("shop", "client")) as s:
            s.settimeout(10)
            s.connect((vip, 80))
            s.sendall(b"GET /items HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
            data = b""
            while len(data) < 1 << 20 and (chunk := s.recv(65536)):
                data += chunk
            out.append(data.split(b"\r\n", 1)[0])
    return out


def _readline(stream: Any, deadline: float) -> str:
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 0.5)
        if ready:
            return str(stream.readline())
    raise AssertionError("no line in time")


def _stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL, to the process group the test started (by its id)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture
def dashboard(cluster: mesh.Cluster, tmp_path: Path) -> Iterator[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = (tmp_path / "dashboard.log").open("w")
    argv = [sys.executable, "-m", "ambientctl.cli", "--state-root", str(cluster.state.dir.parent),
            "dashboard", str(CLUSTER_FILE), "--port", "0", "--no-browser"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                            cwd=ROOT, start_new_session=True)  # fmt: skip
    try:
        line = _readline(proc.stdout, time.monotonic() + START_TIMEOUT)
        assert " at http://127.0.0.1:" in line, (line, (tmp_path / "dashboard.log").read_text())
        yield line.split(" at ", 1)[1].split()[0]
    finally:
        _stop(proc)
        log.close()
    assert proc.returncode == 0, (tmp_path / "dashboard.log").read_text()


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[int]:
    """A headless Chromium (as root: --no-sandbox); yields its DevTools port."""
    profile = tmp_path / "chromium-profile"
    log = (tmp_path / "chromium.log").open("w")
    argv = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--disable-sync", "--window-size=1400,1000",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            f"--user-data-dir={profile}", "about:blank"]  # fmt: skip
    # Its singleton lock and socket go under TMPDIR: in the test's directory, not /tmp.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True, env=env)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, (tmp_path / "chromium.log").read_text()
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            time.sleep(0.1)
        yield int(port_file.read_text().split()[0])
    finally:
        _stop(proc)
        log.close()


class Page:
    """One browser tab over the DevTools protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        async with asyncio.timeout(CDP_TIMEOUT):
            while True:
                msg = await self.ws.receive_json()
                if msg.get("id") == self.next_id:
                    assert "error" not in msg, msg
                    result: dict[str, Any] = msg.get("result", {})
                    return result

    async def js(self, expression: str) -> Any:
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    async def wait_for(self, expression: str, what: str) -> Any:
        deadline = time.monotonic() + WAIT_TIMEOUT
        while True:
            value = await self.js(expression)
            if value:
                return value
            if time.monotonic() >= deadline:
                await self.screenshot(f"timeout-{what.replace(' ', '-')}")
                raise AssertionError(f"the page never showed {what}")
            await asyncio.sleep(0.5)

    async def screenshot(self, name: str) -> Path:
        r = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        path.write_bytes(base64.b64decode(r["data"]))
        print(f"screenshot: {path}")
        return path


def edge(selector: str) -> str:
    """JS: the data attributes of the edge `selector`, or null."""
    return f"(() => {{ const e = document.querySelector('{selector}'); " \
           "return e ? Object.assign({}, e.dataset) : null; })()"  # fmt: skip


async def drive(devtools_port: int, url: str, cluster: mesh.Cluster) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CDP_TIMEOUT)) as http:
        async with http.get(f"http://127.0.0.1:{devtools_port}/json/list") as r:
            targets = json.loads(await r.text())
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        async with http.ws_connect(ws_url, max_msg_size=64 << 20) as ws:
            page = Page(ws)
            await page.call("Page.enable")
            await page.call("Page.navigate", url=url)
            await page.wait_for("document.querySelector('#graph .node') !== null", "the graph")
            # The mesh's picture: every workload and service, the outsider marked.
            ids = await page.js("[...document.querySelectorAll('.node')].map(n => n.dataset.id)")
            assert {"workload:shop/client", "workload:shop/web", "service:shop/web",
                    "workload:plain/outsider", "waypoint:shop/waypoint"} <= set(ids)  # fmt: skip
            state = await page.js(
                "document.querySelector('.node[data-id=\"workload:plain/outsider\"]').dataset.state"
            )
            assert state == "not-enrolled"

            assert await asyncio.to_thread(talk, cluster, "shop", "client", 5) == 5
            assert await asyncio.to_thread(talk, cluster, "plain", "outsider", 3) == 3
            answers = await asyncio.to_thread(requests, cluster, 4)
            assert answers == [b"HTTP/1.1 200 OK"] * 4
            client = await page.wait_for(
                f"(() => {{ const d = {edge(CLIENT_EDGE)}; "
                "return d && Number(d.connections) >= 5 ? d : null; })()",
                "the client's edge",
            )
            assert client["security"] == "mtls" and client["denied"] == "false"
            assert (await page.wait_for(edge(SERVICE_EDGE), "service edge"))["security"] == "mtls"
            outsider = await page.wait_for(edge(OUTSIDER_EDGE), "the outsider's edge")
            assert outsider["security"] == "plaintext"
            # The waypoint in its place: between the client and the service it serves.
            to_waypoint = await page.wait_for(
                f"(() => {{ const d = {edge(TO_WAYPOINT)}; "
                "return d && Number(d.requests) >= 4 ? d : null; })()",
                "the client's requests to the waypoint",
            )
            assert to_waypoint["security"] == "mtls"
            assert (
                float((await page.wait_for(edge(FROM_WAYPOINT), "waypoint edge"))["requests"]) >= 4
            )
            assert float((await page.wait_for(edge(TO_API), "api edge"))["requests"]) >= 4
            assert await page.js(edge('.edge[data-target="service:shop/api"]'
                                      '[data-source="workload:shop/client"]')) is None  # fmt: skip
            await page.screenshot("1-traffic")

            done = mesh.apply_resources(cluster, [DENY_CLIENT], "test")
            assert done.digest is not None
            await asyncio.to_thread(mesh.wait_config, cluster, done.digest, 60.0)
            assert await asyncio.to_thread(talk, cluster, "shop", "client", 4) == 0
            denied = await page.wait_for(
                f"(() => {{ const d = {edge(CLIENT_EDGE)}; "
                "return d && d.denied === 'true' ? d : null; })()",
                "the denial",
            )
            assert float(denied["deniedTotal"]) >= 1
            # The outsider's plaintext traffic is not the client's: no denial there.
            assert (await page.js(edge(OUTSIDER_EDGE)))["denied"] == "false"
            await page.screenshot("2-denied")

            # Clicking the edge shows why: the explain view, with the policy's verdict.
            await page.js(
                f"document.querySelector('{CLIENT_EDGE} path')"
                ".dispatchEvent(new MouseEvent('click', {bubbles: true}))"
            )
            text = await page.wait_for(
                "(() => { const t = document.getElementById('explain').textContent; "
                "return t.includes('authorization:') ? t : null; })()",
                "the explain view",
            )
            assert "ambientctl explain shop/client" in text
            assert "DENIED" in text and "deny-client" in text
            await page.screenshot("3-explain")


def test_the_page_draws_the_mesh_and_a_denial_appears_on_its_edge(
    cluster: mesh.Cluster, dashboard: str, chromium: int
) -> None:
    asyncio.run(drive(chromium, dashboard, cluster))
