"""An asyncio client of the Kubernetes REST API, over aiohttp, returning plain JSON dicts.

Why not kubernetes-asyncio or lightkube: an informer must learn that its watch expired (410
Gone) so that it relists and notices what was deleted meanwhile; lightkube restarts such a
watch from "now" by itself, and both build typed models for every object, which a control
plane listing 10 000 pods does not need. aiohttp is already the project's HTTP client.

Credentials come from a kubeconfig (token or client certificate) or, inside a pod, from the
service-account mount (`in_cluster`). Every error is a `KubeApiError` carrying the HTTP status
and the API server's own message.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from kube.kinds import Kind

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# A token read from a file is read again at least this often (client-go's interval): a
# bound token the kubelet projects is renewed in place before it expires.
TOKEN_REREAD_S = 60.0
# A watch is re-opened at least this often (the API server's own bound is minutes); a reader
# of a dead TCP connection would otherwise wait for ever.
WATCH_TIMEOUT_S = 240
MAX_EVENT_BYTES = 16 << 20

Obj = dict[str, Any]


class KubeApiError(RuntimeError):
    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class KubeConfig:
    server: str
    token: str | None = None
    token_file: str | None = None  # read again every TOKEN_REREAD_S; `token` the first read
    ca_file: str | None = None
    ca_data: bytes | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        ctx = ssl.create_default_context(
            cafile=self.ca_file, cadata=self.ca_data.decode() if self.ca_data else None
        )
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def load_kubeconfig(path: str | Path, context: str | None = None) -> KubeConfig:
    """The cluster and user of `context` (default: current-context) of a kubeconfig file."""
    import base64

    import yaml

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise KubeApiError(0, f"cannot read kubeconfig {p}: {e}") from e
    if not isinstance(doc, dict):
        raise KubeApiError(0, f"kubeconfig {p} is not a mapping")

    def named(section: str, name: str) -> dict[str, Any]:
        for item in doc.get(section) or []:
            if isinstance(item, dict) and item.get("name") == name:
                inner = item.get(section[:-1])
                if isinstance(inner, dict):
                    return inner
        raise KubeApiError(0, f"kubeconfig {p}: no {section[:-1]} named {name!r}")

    ctx_name = context or doc.get("current-context")
    if not isinstance(ctx_name, str):
        raise KubeApiError(0, f"kubeconfig {p}: no current-context")
    ctx = named("contexts", ctx_name)
    cluster = named("clusters", str(ctx.get("cluster")))
    user = named("users", str(ctx.get("user")))

    def rel(v: object) -> str | None:
        if not isinstance(v, str):
            return None
        return v if os.path.isabs(v) else str(p.parent / v)

    ca_data = cluster.get("certificate-authority-data")
    return KubeConfig(
        server=str(cluster.get("server", "")).rstrip("/"),
        token=user.get("token") if isinstance(user.get("token"), str) else None,
        ca_file=rel(cluster.get("certificate-authority")),
        ca_data=base64.b64decode(ca_data) if isinstance(ca_data, str) else None,
        cert_file=rel(user.get("client-certificate")),
        key_file=rel(user.get("client-key")),
        insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
    )


def in_cluster() -> KubeConfig:
    """A pod's own credentials: its service-account token and the cluster CA."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise KubeApiError(0, "not in a cluster: KUBERNETES_SERVICE_HOST is not set")
    token_file = SA_DIR / "token"
    token = token_file.read_text(encoding="ascii").strip()
    return KubeConfig(
        server=f"https://{host}:{port}",
        token=token,
        token_file=str(token_file),
        ca_file=str(SA_DIR / "ca.crt"),
    )


def config_from_env(env: Mapping[str, str]) -> KubeConfig:
    """KUBECONFIG if set, else the in-cluster service account."""
    kc = env.get("KUBECONFIG")
    if kc:
        return load_kubeconfig(kc.split(":")[0])
    return in_cluster()


class KubeClient:
    """One aiohttp session to one API server. Close it with `close()` (or `async with`)."""

    def __init__(self, config: KubeConfig, *, timeout: float = 30.0) -> None:
        self.config = config
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._token = config.token
        self._token_read = time.monotonic()

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Accept": "application/json"}
            self._session = aiohttp.ClientSession(
                headers=headers,
                connector=aiohttp.TCPConnector(ssl=self.config.ssl_context(), limit=32),
                # Events of a watch can be large (a big CRD object): the line limit grows.
                read_bufsize=1 << 16,
            )
        return self._session

    def _auth(self) -> dict[str, str]:
        """The Authorization header of the next request: a token file read again once
        TOKEN_REREAD_S has passed (the last good read kept if the file cannot be read)."""
        path = self.config.token_file
        if path and time.monotonic() - self._token_read >= TOKEN_REREAD_S:
            self._token_read = time.monotonic()
            try:
                token = Path(path).read_text(encoding="ascii").strip()
            except (OSError, UnicodeDecodeError):
                token = ""
            if token:
                self._token = token
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: object | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        url = self.config.server + path
        if params:
            url += "?" + urlencode(params)
        data = None if body is None else json.dumps(body).encode()
        headers = self._auth()
        if data is not None:
            headers["Content-Type"] = content_type
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with self._sess().request(
            method, url, data=data, headers=headers, timeout=timeout
        ) as r:
            text = await r.text()
            if r.status >= 400:
                raise _error(r.status, text)
            try:
                out = json.loads(text) if text else {}
            except ValueError as e:
                raise KubeApiError(r.status, f"not JSON from {method} {path}: {e}") from e
            if not isinstance(out, dict):
                raise KubeApiError(r.status, f"{method} {path}: answer is not an object")
            return out

    async def get(self, kind: Kind, name: str, namespace: str | None = None) -> Obj:
        return await self.request("GET", kind.path(namespace, name))

    async def find(self, kind: Kind, name: str, namespace: str | None = None) -> Obj | None:
        """`get`, with None for an object that does not exist (404)."""
        try:
            return await self.get(kind, name, namespace)
        except KubeApiError as e:
            if e.status == 404:
                return None
            raise

    async def list(
        self,
        kind: Kind,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> Obj:
        params = {}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        return await self.request("GET", kind.path(namespace), params=params)

    async def create(self, kind: Kind, obj: Obj, namespace: str | None = None) -> Obj:
        return await self.request("POST", kind.path(namespace), body=obj)

    async def replace(self, kind: Kind, obj: Obj, namespace: str | None = None) -> Obj:
        name = str(obj.get("metadata", {}).get("name", ""))
        return await self.request("PUT", kind.path(namespace, name), body=obj)

    async def patch(
        self,
        kind: Kind,
        name: str,
        patch: Obj,
        namespace: str | None = None,
        *,
        subresource: str = "",
        merge: str = "merge",
    ) -> Obj:
        ctype = {
            "merge": "application/merge-patch+json",
            "strategic": "application/strategic-merge-patch+json",
        }[merge]
        path = kind.path(namespace, name) + (f"/{subresource}" if subresource else "")
        return await self.request("PATCH", path, body=patch, content_type=ctype)

    async def apply(
        self,
        kind: Kind,
        obj: Obj,
        namespace: str | None = None,
        *,
        manager: str,
        force: bool = True,
    ) -> Obj:
        """Server-side apply: the fields `manager` owns become exactly `obj`'s."""
        name = str(obj.get("metadata", {}).get("name", ""))
        params = {"fieldManager": manager, "force": "true" if force else "false"}
        return await self.request(
            "PATCH",
            kind.path(namespace, name),
            params=params,
            body=obj,
            content_type="application/apply-patch+yaml",
        )

    async def delete(self, kind: Kind, name: str, namespace: str | None = None) -> Obj:
        return await self.request("DELETE", kind.path(namespace, name))

    async def watch(
        self,
        kind: Kind,
        resource_version: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_s: int = WATCH_TIMEOUT_S,
    ) -> AsyncIterator[tuple[str, Obj]]:
        """(type, object) events after `resource_version` until the server ends the watch.

        An expired version comes as `KubeApiError(410)`, whether the server says so by status
        or by an ERROR event: the caller relists.
        """
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_s),
            "allowWatchBookmarks": "true",
        }
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        url = self.config.server + kind.path(namespace) + "?" + urlencode(params)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout_s + 30)
        async with self._sess().get(url, headers=self._auth(), timeout=timeout) as r:
            if r.status >= 400:
                raise _error(r.status, await r.text())
            while True:
                try:
                    line = await r.content.readuntil(b"\n")
                except ValueError as e:  # a line over the stream's limit
                    raise KubeApiError(0, f"watch event too large: {e}") from e
                if not line:
                    return  # the server ended the watch (its timeout, or a restart)
                if not line.endswith(b"\n"):
                    raise KubeApiError(0, "watch ended inside an event")
                if len(line) > MAX_EVENT_BYTES:
                    raise KubeApiError(0, "watch event too large")
                if not line.strip():
                    continue
                try:
                    ev = json.loads(line)
                    etype = str(ev["type"])
                    obj = ev["object"]
                except (ValueError, KeyError, TypeError) as e:
                    raise KubeApiError(0, f"malformed watch event: {e}") from e
                if not isinstance(obj, dict):
                    raise KubeApiError(0, "malformed watch event: object is not a mapping")
                if etype == "ERROR":
                    raise KubeApiError(
                        int(obj.get("code", 0) or 0),
                        str(obj.get("message", "")),
                        str(obj.get("reason", "")),
                    )
                yield etype, obj


def _error(status: int, text: str) -> KubeApiError:
    try:
        st = json.loads(text)
        if isinstance(st, dict):
            return KubeApiError(status, str(st.get("message", text)), str(st.get("reason", "")))
    except ValueError:
        pass
    return KubeApiError(status, text[:500])
