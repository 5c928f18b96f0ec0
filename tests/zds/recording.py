"""A recording stand-in for the tunnel's NodeProxy, for ZDS protocol tests that would
otherwise need a real network namespace per pod. It keeps NodeProxy's ZDS contract (the
same Add is idempotent, a new netns replaces, fds are released when a pod goes) and
records every call, so tests can compare transcripts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ztunnel.inpod import Enrolment


@dataclass
class RecordingPods:
    enrolment_source: str = "file"
    enrolment_synced: bool = True
    enrolment_detail: str = ""
    serving: dict[str, Enrolment] = field(default_factory=dict)
    calls: list[tuple[str, object]] = field(default_factory=list)
    starts: list[str] = field(default_factory=list)  # uids whose proxy was (re)started
    fail: dict[str, str] = field(default_factory=dict)  # uid -> error raised by add_pod
    hold: dict[str, asyncio.Event] = field(default_factory=dict)  # uid -> add_pod waits

    async def add_pod(self, enrolment: Enrolment) -> None:
        uid = enrolment.uid
        self.calls.append(("add", uid))
        gate = self.hold.get(uid)
        if gate is not None:
            try:
                await gate.wait()
            except asyncio.CancelledError:
                enrolment.release()  # as NodeProxy: the fd is ours once add_pod is called
                raise
        current = self.serving.get(uid)
        if current is not None and current == enrolment:
            enrolment.release()
            return
        if uid in self.fail:
            enrolment.release()
            raise RuntimeError(self.fail[uid])
        if current is not None:
            current.release()
        self.serving[uid] = enrolment
        self.starts.append(uid)

    async def remove_pod(self, uid: str) -> None:
        self.calls.append(("remove", uid))
        current = self.serving.pop(uid, None)
        if current is not None:
            current.release()

    async def keep_only(self, uids: set[str]) -> None:
        self.calls.append(("keep_only", frozenset(uids)))
        for uid in [u for u in self.serving if u not in uids]:
            self.serving.pop(uid).release()

    def close(self) -> None:
        for enrolment in self.serving.values():
            enrolment.release()
        self.serving.clear()
