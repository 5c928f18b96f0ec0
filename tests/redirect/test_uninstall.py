"""The node agent's uninstall decision (pure) and its readiness answers."""

from __future__ import annotations

from redirect.readiness import answer
from redirect.uninstall import daemonset_going, owning_daemonset


def _pod(*refs: dict[str, object]) -> dict[str, object]:
    return {"metadata": {"name": "agent-x", "ownerReferences": list(refs)}}


DS_REF = {
    "apiVersion": "apps/v1",
    "kind": "DaemonSet",
    "name": "ambient-node-agent",
    "uid": "ds-1",
    "controller": True,
}


def test_the_owning_daemonset_is_the_controller_ref() -> None:
    assert owning_daemonset(_pod(DS_REF)) == ("ambient-node-agent", "ds-1")
    assert owning_daemonset(_pod({**DS_REF, "controller": False})) is None
    assert owning_daemonset(_pod({**DS_REF, "kind": "ReplicaSet"})) is None
    assert owning_daemonset(_pod({**DS_REF, "apiVersion": "extensions/v1beta1"})) is None
    assert owning_daemonset({"metadata": {}}) is None


def test_a_daemonset_gone_replaced_or_deleting_means_uninstall() -> None:
    live = {"metadata": {"name": "ambient-node-agent", "uid": "ds-1"}}
    assert not daemonset_going(live, "ds-1")
    assert daemonset_going(None, "ds-1")
    assert daemonset_going({"metadata": {"uid": "ds-2"}}, "ds-1")
    assert daemonset_going({"metadata": {"uid": "ds-1", "deletionTimestamp": "t"}}, "ds-1")


def test_readiness_answers() -> None:
    get = b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
    assert answer(get, ready=True).startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer(get, ready=False).startswith(b"HTTP/1.1 503 ")
    assert answer(b"GET /healthz HTTP/1.1\r\n\r\n", ready=False).startswith(b"HTTP/1.1 200 ")
    assert answer(b"POST /readyz HTTP/1.1\r\n\r\n", ready=True).startswith(b"HTTP/1.1 404 ")
    assert answer(b"garbage\r\n\r\n", ready=True).startswith(b"HTTP/1.1 400 ")
    head = answer(b"HEAD /readyz HTTP/1.1\r\n\r\n", ready=True)
    assert head.endswith(b"\r\n\r\n") and b"Content-Length: 3" in head
