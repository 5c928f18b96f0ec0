"""The node agent's pod source and enrolment decision (pure, plus the file watcher)."""

from __future__ import annotations

import asyncio
import json
from ipaddress import IPv4Address
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from redirect.enrolment import (
    FilePodSource,
    NodeView,
    PodInfo,
    SourceError,
    parse_source,
    pod_doc,
    redirection_enabled,
    wanted,
)

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def pod(**kw: Any) -> PodInfo:
    base: dict[str, Any] = {
        "uid": "c//Pod/ns/p",
        "name": "p",
        "namespace": "ns",
        "node": "n1",
        "ip": IPv4Address("10.244.1.10"),
        "netns": "/var/run/netns/c-n1-p1",
    }
    base.update(kw)
    for key in ("labels", "annotations"):
        if key in base:
            base[key] = MappingProxyType(base[key])
    return PodInfo(**base)


# ---- the decision (upstream's PodRedirectionEnabled and snapshot exclusions) --------------


@pytest.mark.parametrize(
    ("ns_labels", "p", "expected"),
    [
        (AMBIENT, pod(), True),
        ({}, pod(), False),
        (None, pod(), False),  # unknown namespace: skipped, as upstream
        ({"istio.io/dataplane-mode": "sidecar"}, pod(), False),
        ({}, pod(labels=AMBIENT), True),  # pod-level opt-in
        (AMBIENT, pod(labels={"istio.io/dataplane-mode": "none"}), False),  # opt-out wins
        (AMBIENT, pod(annotations={"sidecar.istio.io/status": "{}"}), False),
        (AMBIENT, pod(host_network=True), False),
        (AMBIENT, pod(phase="Succeeded"), False),
        (AMBIENT, pod(phase="Failed"), False),
        (AMBIENT, pod(phase="Pending"), True),
        (AMBIENT, pod(namespace="istio-system", labels={"app": "ztunnel"}), False),
        (AMBIENT, pod(namespace="other", labels={"app": "ztunnel"}), True),
    ],
)
def test_redirection_enabled(ns_labels: dict[str, str] | None, p: PodInfo, expected: bool) -> None:
    assert redirection_enabled(ns_labels, p) is expected


def test_wanted_needs_ip_netns_and_this_node() -> None:
    view = NodeView(
        "n1",
        MappingProxyType(
            {
                "a": pod(uid="a"),
                "b": pod(uid="b", ip=None),
                "c": pod(uid="c", netns=""),
                "d": pod(uid="d", node="n2"),
            }
        ),
        MappingProxyType({"ns": MappingProxyType(AMBIENT)}),
    )
    assert set(wanted(view)) == {"a"}


# ---- the document ---------------------------------------------------------------------------


def doc(pods: list[dict[str, Any]], namespaces: dict[str, Any] | None = None) -> str:
    return json.dumps(
        {"version": 1, "namespaces": namespaces or {"ns": {"labels": AMBIENT}}, "pods": pods}
    )


def test_parse_round_trip_and_node_filter() -> None:
    p1, p2 = pod(uid="a", labels={"app": "x"}), pod(uid="b", node="n2", host_network=True)
    view = parse_source(doc([pod_doc(p1), pod_doc(p2)]), "n1")
    assert dict(view.pods) == {"a": p1}
    assert view.namespaces["ns"] == AMBIENT
    assert parse_source(doc([pod_doc(p1), pod_doc(p2)]), "n2").pods["b"] == p2


def test_empty_text_is_an_empty_cluster() -> None:
    view = parse_source("", "n1")
    assert not view.pods and not view.namespaces


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("{", "not JSON"),
        ("[]", "pod source: expected a mapping, got a list"),
        ('{"version": 2}', "version"),
        ('{"extra": 1}', "extra: unknown field"),
        ('{"namespaces": []}', "namespaces"),
        ('{"namespaces": {"ns": {"labels": {"a": 1}}}}', "namespaces.ns.labels"),
        ('{"pods": {}}', "pods: expected a list"),
        ('{"pods": [1]}', r"pods\[0\]: expected a mapping, got a number"),
        ('{"pods": [{"uid": "a", "name": "p", "namespace": "ns"}]}', r"pods\[0\].node"),
        (doc([{**pod_doc(pod()), "ip": "10.0.0.300"}]), r"pods\[0\].ip"),
        (doc([{**pod_doc(pod()), "ip": "fd00::1"}]), "only IPv4"),
        (doc([{**pod_doc(pod()), "hostNetwork": "yes"}]), "hostNetwork"),
        (doc([{**pod_doc(pod()), "colour": "red"}]), r"pods\[0\].colour: unknown field"),
        (doc([pod_doc(pod()), pod_doc(pod())]), "appears twice"),
    ],
)
def test_malformed_documents_name_the_field(text: str, field: str) -> None:
    with pytest.raises(SourceError, match=field):
        parse_source(text, "n1")


# ---- the file source ------------------------------------------------------------------------


def test_file_source_delivers_changes_and_keeps_the_last_good_view(aio, tmp_path: Path) -> None:
    path = tmp_path / "pods.json"
    path.write_text(doc([pod_doc(pod(uid="a"))]))
    seen: list[NodeView] = []

    async def scenario() -> None:
        source = aio.closing(FilePodSource(path, "n1", interval=0.01))
        await source.start(seen.append)
        assert [set(v.pods) for v in seen] == [{"a"}]  # the first view, before start returns
        path.write_text("{ not json")
        await asyncio.sleep(0.1)
        assert len(seen) == 1 and "not JSON" in str(source.last_error)
        path.write_text(doc([pod_doc(pod(uid="a")), pod_doc(pod(uid="b", name="q"))]))
        await asyncio.sleep(0.1)
        assert source.last_error is None
        path.write_text(doc([pod_doc(pod(uid="a")), pod_doc(pod(uid="b", name="q"))]))
        await asyncio.sleep(0.05)  # same text: no new delivery

    aio.run(scenario)
    assert [set(v.pods) for v in seen] == [{"a"}, {"a", "b"}]


def test_missing_file_is_an_empty_view(tmp_path: Path) -> None:
    source = FilePodSource(tmp_path / "absent.json", "n1")
    view = source.check()
    assert view is not None and not view.pods
