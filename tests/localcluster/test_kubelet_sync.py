"""The kubelet's sync pass while a pod's record goes away under it (a termination task
finishing during a status report). The records and the steps around the reports are
stubbed (`__stub_reports`): the race needs one report to await while another task drops
a record, which a real API server answers too fast to hit on purpose. The pass itself is
the kubelet's own code."""

from __future__ import annotations

import asyncio
from typing import Any

from localcluster.kube.kubelet import Kubelet


class _Rec:
    """What the pass reads and writes of a record."""

    def __init__(self, uid: str) -> None:
        self.uid = uid
        self.terminating = False
        self.pod: dict[str, Any] = {}


def test_a_record_dropped_while_another_is_reported_does_not_end_the_pass__stub_reports() -> None:
    async def main() -> list[str]:
        kubelet = Kubelet.__new__(Kubelet)
        kubelet.records = {uid: _Rec(uid) for uid in "abc"}  # type: ignore[misc]
        reported: list[str] = []

        async def report(rec: Any) -> None:
            reported.append(rec.uid)
            if rec.uid == "a":
                # As `_terminate` does when a pod's deletion completes meanwhile.
                kubelet.records.pop("b")
            await asyncio.sleep(0)

        async def step(_rec: Any, _now: float) -> None:
            return None

        async def program(_pods: Any) -> None:
            return None

        kubelet._bound_pods = lambda: {uid: {"metadata": {"uid": uid}} for uid in "abc"}  # type: ignore[method-assign]
        kubelet._step = step  # type: ignore[method-assign,assignment]
        kubelet._report = report  # type: ignore[method-assign]
        kubelet._program_services = program  # type: ignore[method-assign,assignment]
        await kubelet.sync()
        return reported

    assert asyncio.run(main()) == ["a", "c"]
