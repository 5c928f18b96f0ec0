"""A list-then-watch informer: a local cache of one kind that follows the API server.

Invariants:
- the cache is a dict keyed by `namespace/name` (or `name`), replaced object by object; each
  change calls the handler with (event, key, old, new) after the cache holds it;
- the watch resumes from the last resourceVersion seen (events and bookmarks); on 410 Gone,
  or any broken watch that cannot resume, it lists again and reports the difference to the
  cache (objects deleted while nobody watched get a DELETED call), so a consumer never has to
  reread everything;
- `synced` is set once the first list is in the cache; errors retry with backoff (0.2 s to
  10 s) and are logged once per streak, never raised to the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import aiohttp

from kube.client import KubeApiError, KubeClient, Obj
from kube.kinds import Kind

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 10.0


class Event(Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


Handler = Callable[[Event, str, "Obj | None", "Obj | None"], None]


def object_key(obj: Obj) -> str:
    md = obj.get("metadata") or {}
    ns = md.get("namespace")
    name = str(md.get("name", ""))
    return f"{ns}/{name}" if ns else name


def resource_version(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))


@dataclass(slots=True)
class Informer:
    client: KubeClient
    kind: Kind
    namespace: str | None = None
    label_selector: str | None = None
    field_selector: str | None = None
    handlers: list[Handler] = field(default_factory=list)
    cache: dict[str, Obj] = field(default_factory=dict)
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    version: str = ""
    relists: int = 0
    _task: asyncio.Task[None] | None = None

    def add_handler(self, h: Handler) -> None:
        self.handlers.append(h)

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"informer-{self.kind.plural}")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def get(self, key: str) -> Obj | None:
        return self.cache.get(key)

    def items(self) -> list[Obj]:
        return list(self.cache.values())

    async def run(self) -> None:
        backoff = BACKOFF_MIN_S
        failing = False
        while True:
            try:
                if not self.version:
                    await self._relist()
                await self._watch()
                backoff = BACKOFF_MIN_S
                failing = False
            except asyncio.CancelledError:
                raise
            except KubeApiError as e:
                if e.status == 410:
                    # Our version is older than the server keeps: what changed meanwhile is
                    # only knowable by listing again.
                    self.version = ""
                    continue
                failing = self._failed(failing, e)
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                failing = self._failed(failing, e)
            except RuntimeError as e:
                # aiohttp raises a bare RuntimeError("Connection closed.") when the connection
                # under a watch goes while it reads: a broken watch like any other.
                failing = self._failed(failing, e)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _failed(self, failing: bool, e: BaseException) -> bool:
        if not failing:
            log.warning("informer %s: %s; retrying", self.kind.plural, e)
        return True

    async def _relist(self) -> None:
        out = await self.client.list(
            self.kind,
            self.namespace,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
        )
        items = out.get("items") or []
        fresh: dict[str, Obj] = {}
        for obj in items:
            if isinstance(obj, dict):
                # A list's items carry neither kind nor apiVersion; consumers expect both.
                obj.setdefault("kind", self.kind.kind)
                obj.setdefault("apiVersion", self.kind.api_version)
                fresh[object_key(obj)] = obj
        old = self.cache
        self.cache = fresh
        self.version = str((out.get("metadata") or {}).get("resourceVersion", ""))
        if self.synced.is_set():
            self.relists += 1
        for key, obj in fresh.items():
            prev = old.get(key)
            if prev is None:
                self._emit(Event.ADDED, key, None, obj)
            elif resource_version(prev) != resource_version(obj):
                self._emit(Event.MODIFIED, key, prev, obj)
        for key, prev in old.items():
            if key not in fresh:
                self._emit(Event.DELETED, key, prev, None)
        self.synced.set()

    async def _watch(self) -> None:
        async for etype, obj in self.client.watch(
            self.kind,
            self.version,
            self.namespace,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
        ):
            rv = resource_version(obj)
            if etype == "BOOKMARK":
                self.version = rv or self.version
                continue
            key = object_key(obj)
            prev = self.cache.get(key)
            if etype == "DELETED":
                self.cache.pop(key, None)
                if prev is not None:
                    self._emit(Event.DELETED, key, prev, None)
            elif etype in ("ADDED", "MODIFIED"):
                self.cache[key] = obj
                self._emit(Event.MODIFIED if prev is not None else Event.ADDED, key, prev, obj)
            if rv:
                self.version = rv

    def _emit(self, ev: Event, key: str, old: Obj | None, new: Obj | None) -> None:
        for h in self.handlers:
            try:
                h(ev, key, old, new)
            except Exception:  # a consumer's bug must not stop the cache following the server
                log.exception("informer %s: handler failed on %s %s", self.kind.plural, ev, key)
