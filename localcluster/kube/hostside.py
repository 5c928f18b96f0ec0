"""The host's services of one local Kubernetes cluster, run by its kubelet (I/O).

`HostSide.start` gives br0 in the cluster netns the host's address and the routes back to
every node's pods (`localcluster.network.ensure_host_network`), opens the host's sockets
inside the cluster netns (`nsutil.socket_in`: made there, served from the kubelet's loop in
the caller's netns), serves on them
- the API server (`apiforward`, 10.10.0.1:6443 -> the kubeconfig's server on loopback),
- the cluster DNS (`clusterdns`, 10.10.0.1:53 UDP and TCP, from the Services, the ready
  pods of the kubelet's nodes and the Endpoints objects),
and, the other way, a port on the host's loopback forwarded to a ready istiod pod's webhook
port (from its Endpoints as the service proxy reads them; dialled from the cluster netns),
which the API server calls as istiod's admission webhook (its base URL written beside the
kubeconfig, `admission_url_file`; the API server itself never routes to a Service address),
and writes what points the cluster at them: the `default/kubernetes` Endpoints and the
`kube-system/kube-dns` Service with its Endpoints (`hostnet`). It also follows the
Endpoints objects, which the kubelet's service proxy needs for selector-less Services
(`listed`).

Nothing here stops the kubelet: a step that fails (the address in use while a predecessor
still holds it, the API server away) is logged and retried in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp

import nsutil
from kube import kinds
from kube.client import KubeApiError, KubeClient
from kube.informer import Informer
from localcluster.kube import hostnet
from localcluster.kube.apiforward import ApiForwarder, ForwardLimits
from localcluster.kube.clusterdns import ClusterDns, DnsLimits
from localcluster.kube.dnszone import Zone, build_zone
from localcluster.kube.podplan import service_info
from localcluster.kube.proxyplan import ListedEndpoints, endpoint_of, listed_endpoints
from localcluster.network import NetworkError, NetworkLayout, ensure_host_network, plan_host_network
from meshcore.sockets import LISTEN_BACKLOG

log = logging.getLogger("kubelet.host")

T = TypeVar("T")
IoRunner = Callable[..., Awaitable[Any]]
FIELD_MANAGER = "local-kubelet"
RETRY_MIN_S = 0.5
RETRY_MAX_S = 10.0
ZONE_MIN_AGE_S = 0.2  # a burst of changes rebuilds the zone at most this often
# istiod's admission webhook (the control plane chart: Service istiod, its port
# https-webhook), which the API server calls by a URL on the host's loopback.
ADMISSION_SERVICE = ("istio-system", "istiod")
ADMISSION_PORT_NAME = "https-webhook"


def admission_url_file(kubeconfig: Path | str) -> Path:
    """Where the kubelet writes the base URL (https://127.0.0.1:<port>) the API server
    reaches istiod's webhook at."""
    return Path(kubeconfig).parent / "istiod-admission.url"


def admission_target(listed: Sequence[ListedEndpoints]) -> tuple[str, int] | None:
    """A ready istiod address and its webhook port, from the Endpoints as listed; or None."""
    ns, name = ADMISSION_SERVICE
    for endpoints in listed:
        if (endpoints.namespace, endpoints.name) == (ns, name):
            targets = endpoints.targets(ADMISSION_PORT_NAME, "TCP")
            return targets[0] if targets else None
    return None


def open_host_sockets(netns_path: str) -> tuple[socket.socket, socket.socket, socket.socket]:
    """The API listener and the DNS UDP and TCP sockets, bound to the host's address in
    the namespace at `netns_path` (made there; bound and served from anywhere)."""
    host = str(hostnet.HOST_ADDRESS)
    fd = nsutil.open_netns(netns_path)
    made: list[socket.socket] = []
    try:
        api = nsutil.socket_in(fd, socket.AF_INET, socket.SOCK_STREAM)
        made.append(api)
        udp = nsutil.socket_in(fd, socket.AF_INET, socket.SOCK_DGRAM)
        made.append(udp)
        tcp = nsutil.socket_in(fd, socket.AF_INET, socket.SOCK_STREAM)
        made.append(tcp)
        for s in (api, tcp):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        api.bind((host, hostnet.APISERVER_PORT))
        api.listen(LISTEN_BACKLOG)
        udp.bind((host, hostnet.DNS_PORT))
        tcp.bind((host, hostnet.DNS_PORT))
        tcp.listen(LISTEN_BACKLOG)
    except BaseException:
        for s in made:
            s.close()
        raise
    finally:
        os.close(fd)
    return api, udp, tcp


def upstream_of(server: str) -> tuple[str, int]:
    """The API server's host and port from a kubeconfig's server URL."""
    url = urlsplit(server)
    if not url.hostname:
        raise ValueError(f"API server URL {server!r} has no host")
    return url.hostname, url.port or (443 if url.scheme == "https" else 80)


class HostSide:
    def __init__(
        self,
        client: KubeClient,
        layout: NetworkLayout,
        services: Informer,
        pods: Sequence[Informer],
        wake: Callable[[], None],
        io: IoRunner,
        forward_limits: ForwardLimits | None = None,
        dns_limits: DnsLimits | None = None,
        admission_url_file: Path | None = None,
    ) -> None:
        self.client = client
        self.layout = layout
        self.services = services
        self.pods = tuple(pods)
        self.wake = wake
        self.io = io
        self.endpoints = Informer(client, kinds.ENDPOINTS)
        self.forwarder = ApiForwarder(*upstream_of(client.config.server), limits=forward_limits)
        # The other way: the API server (on the host's loopback) to istiod's webhook in a pod.
        self.admission = ApiForwarder("", 0, limits=forward_limits, dial=self._dial_admission)
        self.admission_url_file = admission_url_file
        self.dns = ClusterDns(self.zone, dns_limits)
        self.serving = asyncio.Event()
        self.published = asyncio.Event()
        self._zone: Zone | None = None
        self._zone_at = 0.0
        self._dirty = True
        self._listed: list[ListedEndpoints] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sockets: tuple[socket.socket, ...] = ()

        def changed(*_: object) -> None:
            self._dirty = True

        def endpoints_changed(*_: object) -> None:
            self._dirty = True
            self._listed = None
            self.wake()  # the service proxy reads them

        for inf in (services, *self.pods):
            inf.add_handler(changed)
        self.endpoints.add_handler(endpoints_changed)

    # ---- what the kubelet reads ----------------------------------------------------------

    def listed(self) -> list[ListedEndpoints]:
        """The Endpoints objects, read again only after one changed (every sync asks)."""
        if self._listed is None:
            self._listed = [listed_endpoints(e) for e in self.endpoints.items()]
        return self._listed

    def zone(self) -> Zone:
        now = time.monotonic()
        if self._zone is None or (self._dirty and now - self._zone_at >= ZONE_MIN_AGE_S):
            self._dirty = False
            self._zone_at = now
            pods = [ep for inf in self.pods for p in inf.items() if (ep := endpoint_of(p))]
            services = [service_info(s) for s in self.services.items()]
            self._zone = build_zone(hostnet.CLUSTER_DOMAIN, services, pods, self.listed())
        return self._zone

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Follow the Endpoints (until the first list is in), then serve and publish in the
        background."""
        self.endpoints.start()
        await self.endpoints.synced.wait()
        self._spawn(self._serve(), "host-serve")
        self._spawn(self._publish(), "host-publish")

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.endpoints.stop()
        await self.forwarder.close()
        await self.admission.close()
        await self.dns.close()
        for s in self._sockets:
            s.close()

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self) -> None:
        plan = plan_host_network(self.layout, hostnet.HOST_ADDRESS, hostnet.HOST_PREFIXLEN)
        delay = RETRY_MIN_S
        while True:
            try:
                await self.io(ensure_host_network, self.layout, plan)
                sockets = await self.io(open_host_sockets, self.layout.cluster_netns_path)
                break
            except (NetworkError, OSError) as e:
                log.warning("host: cannot serve on %s yet: %s; retrying", plan.address, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
        api, udp, tcp = sockets
        # On the host's loopback only: the API server is its one client.
        webhook = socket.create_server(("127.0.0.1", 0), backlog=LISTEN_BACKLOG)
        self._sockets = (*sockets, webhook)
        await self.forwarder.start(api)
        await self.admission.start(webhook)
        await self.dns.start(udp, tcp)
        if self.admission_url_file is not None:
            url = f"https://127.0.0.1:{webhook.getsockname()[1]}"
            tmp = self.admission_url_file.with_suffix(".tmp")
            tmp.write_text(url + "\n", encoding="utf-8")
            tmp.replace(self.admission_url_file)
        self.serving.set()
        log.info(
            "host: serving the API server on %s:%d and DNS on %s:%d in %s",
            plan.address,
            hostnet.APISERVER_PORT,
            plan.address,
            hostnet.DNS_PORT,
            self.layout.cluster_netns,
        )

    async def _dial_admission(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to a ready istiod pod's webhook port, made from the cluster's netns
        (where the pods' addresses are routed); LookupError while there is none."""
        target = admission_target(self.listed())
        if target is None:
            raise LookupError(f"no ready endpoint of {'/'.join(ADMISSION_SERVICE)}")
        sock = await self.io(self._cluster_socket)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, target)
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    def _cluster_socket(self) -> socket.socket:
        fd = nsutil.open_netns(self.layout.cluster_netns_path)
        try:
            return nsutil.socket_in(fd, socket.AF_INET, socket.SOCK_STREAM)
        finally:
            os.close(fd)

    async def _publish(self) -> None:
        delay = RETRY_MIN_S
        while True:
            try:
                await self._write_objects()
                self.published.set()
                return
            except (KubeApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
                log.warning("host: writing the host's Services and Endpoints failed: %s", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def _write_objects(self) -> None:
        apply = self.client.apply
        await apply(
            kinds.ENDPOINTS, hostnet.kubernetes_endpoints(), "default", manager=FIELD_MANAGER
        )
        ns = hostnet.DNS_SERVICE_NAMESPACE
        try:
            await apply(kinds.SERVICE, hostnet.dns_service(), ns, manager=FIELD_MANAGER)
        except KubeApiError as e:
            if e.status not in (409, 422):
                raise
            # Its address is another Service's, or a kube-dns of someone else's is there
            # with another one: the host still answers on its own address.
            log.warning("host: Service %s/%s not written: %s", ns, hostnet.DNS_SERVICE_NAME, e)
            return
        await apply(kinds.ENDPOINTS, hostnet.dns_endpoints(), ns, manager=FIELD_MANAGER)
