"""The Kubernetes pod source's pure parts: a Pod object to the agent's pod view, a Namespace
to its labels, and the agent's settings that choose the source. No API server needed."""

from __future__ import annotations

import asyncio
import copy
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from kube.client import KubeClient, KubeConfig
from kube.informer import Event
from kube.podnetns import netns_path
from redirect.agent import SettingsError, build_parser, check_args, run
from redirect.enrolment import NodeView, SourceError, wanted
from redirect.kubesource import KubePodSource, namespace_labels, pod_from_object

UID = "5c120c3c-7710-49ac-b107-6a46b3c02071"
NETNS = str(netns_path(UID))


def pod_obj(**over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "pricing",
            "namespace": "travel",
            "uid": UID,
            "labels": {"app": "pricing"},
            "annotations": {"note": "x"},
        },
        "spec": {"nodeName": "n1", "serviceAccountName": "pricing-sa", "containers": []},
        "status": {"phase": "Running", "podIP": "10.1.0.5"},
    }
    for path, value in over.items():
        section, key = path.split("__")
        if value is None:
            obj[section].pop(key, None)
        else:
            obj[section][key] = value
    return obj


def exists(path: str) -> bool:
    return path == NETNS


def never(path: str) -> bool:
    return False


def test_pod_maps_to_the_view_the_file_source_gives() -> None:
    pod = pod_from_object(pod_obj(), exists)
    assert (pod.uid, pod.name, pod.namespace, pod.node) == (UID, "pricing", "travel", "n1")
    assert pod.service_account == "pricing-sa"
    assert pod.ip == IPv4Address("10.1.0.5")
    assert pod.netns == NETNS
    assert dict(pod.labels) == {"app": "pricing"}
    assert dict(pod.annotations) == {"note": "x"}
    assert pod.host_network is False
    assert pod.phase == "Running"


def test_defaults_of_a_fresh_pod() -> None:
    pod = pod_from_object(
        pod_obj(spec__serviceAccountName=None, status__phase=None, metadata__labels=None), exists
    )
    assert pod.service_account == "default"
    assert pod.phase == "Pending"
    assert dict(pod.labels) == {}


@pytest.mark.parametrize(
    ("over", "check"),
    [
        pytest.param({}, never, id="netns-not-there-yet"),
        pytest.param({"status__podIP": None}, exists, id="no-pod-ip"),
        pytest.param({"status__podIP": ""}, exists, id="empty-pod-ip"),
        pytest.param({"status__podIP": "fd00::5"}, exists, id="ipv6-only"),
    ],
)
def test_not_yet_enrollable(over: dict[str, Any], check: Any) -> None:
    pod = pod_from_object(pod_obj(**over), check)
    assert pod.netns == ""
    labels = {"travel": {"istio.io/dataplane-mode": "ambient"}}
    assert wanted(NodeView("n1", {pod.uid: pod}, labels)) == {}


def test_host_network_and_decision_inputs_pass_through() -> None:
    obj = pod_obj(spec__hostNetwork=True)
    obj["metadata"]["annotations"]["sidecar.istio.io/status"] = "{}"
    pod = pod_from_object(obj, exists)
    assert pod.host_network is True
    assert "sidecar.istio.io/status" in pod.annotations
    labels = {"travel": {"istio.io/dataplane-mode": "ambient"}}
    assert wanted(NodeView("n1", {pod.uid: pod}, labels)) == {}
    plain = pod_from_object(pod_obj(), exists)
    assert set(wanted(NodeView("n1", {plain.uid: plain}, labels))) == {UID}


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"metadata__uid": None}, "metadata.uid"),
        ({"metadata__uid": "not/a/uid"}, "metadata.uid"),
        ({"metadata__name": 5}, "metadata.name"),
        ({"metadata__labels": {"a": 1}}, "metadata.labels"),
        ({"metadata__annotations": ["x"]}, "metadata.annotations"),
        ({"spec__nodeName": None}, "spec.nodeName"),
        ({"spec__serviceAccountName": 3}, "spec.serviceAccountName"),
        ({"status__podIP": "10.1.0.999"}, "status.podIP"),
        ({"status__phase": ["Running"]}, "status.phase"),
    ],
)
def test_malformed_pod_names_the_field(over: dict[str, Any], field: str) -> None:
    with pytest.raises(SourceError, match=field.replace(".", r"\.")):
        pod_from_object(pod_obj(**over), exists)


def test_malformed_sections() -> None:
    obj = pod_obj()
    obj["spec"] = "x"
    with pytest.raises(SourceError, match="spec"):
        pod_from_object(obj, exists)


def test_mapping_does_not_alias_the_object() -> None:
    obj = pod_obj()
    pod = pod_from_object(copy.deepcopy(obj), exists)
    obj["metadata"]["labels"]["app"] = "changed"
    assert pod.labels["app"] == "pricing"


def test_namespace_labels() -> None:
    ns = {"metadata": {"name": "travel", "labels": {"istio.io/dataplane-mode": "ambient"}}}
    assert dict(namespace_labels(ns)) == {"istio.io/dataplane-mode": "ambient"}
    assert dict(namespace_labels({"metadata": {"name": "bare"}})) == {}
    with pytest.raises(SourceError, match=r"metadata\.labels"):
        namespace_labels({"metadata": {"labels": {"a": None}}})


# ---- the agent's settings ----------------------------------------------------------------------


def settings(argv: list[str], env: dict[str, str]) -> Any:
    parser = build_parser(env)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def test_settings_from_the_environment() -> None:
    args = settings([], {"NODE_NAME": "n1", "POD_SOURCE": "kubernetes", "KUBECONFIG": "/k"})
    assert (args.node, args.pod_source, args.kubeconfig) == ("n1", "kubernetes", "/k")
    # A flag overrides its variable; the file source stays the default.
    args = settings(["--node", "n2", "--pods-file", "/p"], {"NODE_NAME": "n1"})
    assert (args.node, args.pod_source, str(args.pods_file)) == ("n2", "file", "/p")
    # In-cluster credentials when no kubeconfig is named.
    assert settings(["--pod-source", "kubernetes", "--node", "n"], {}).kubeconfig is None


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"POD_SOURCE": "kubernetes"}, "node name is required"),
        (["--node", "n"], {}, "--pods-file is required"),
        (["--node", "n", "--pod-source", "etcd"], {}, "not one of file, kubernetes"),
    ],
)
def test_bad_settings_are_usage_errors(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        settings(argv, env)
    assert done.value.code == 2
    assert message in capsys.readouterr().err


def test_unreadable_kubeconfig_is_a_settings_error(tmp_path: Path) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("- not a kubeconfig\n")
    args = settings(["--pod-source", "kubernetes", "--node", "n", "--kubeconfig", str(bad)], {})
    # Refused before anything is built: no netns, socket or rule is touched.
    with pytest.raises(SettingsError, match=r"Kubernetes credentials: kubeconfig .* not a mapping"):
        asyncio.run(run(args))


# ---- the source's bookkeeping, fed informer events by hand -------------------------------------
# (A real API server validates every object, so it cannot hand out the malformed pod these
# tests need; the informer is left out and its handler called directly.)


def hand_fed_source() -> tuple[KubePodSource, list[NodeView]]:
    source = KubePodSource(KubeClient(KubeConfig("https://127.0.0.1:9")), "n1", netns_exists=exists)
    views: list[NodeView] = []
    source._on_change = views.append
    return source, views


def test_mock_informer_no_view_before_the_first_lists_then_one_view_per_burst() -> None:
    async def scenario() -> None:
        source, views = hand_fed_source()
        ns = {"metadata": {"name": "travel", "labels": {"istio.io/dataplane-mode": "ambient"}}}
        source._on_namespace(Event.ADDED, "travel", None, ns)
        source._on_pod(Event.ADDED, "travel/pricing", None, pod_obj())
        await asyncio.sleep(0)
        assert views == []  # a view without its namespaces could release every pod
        before = source.last_error
        source._first_publish()
        assert len(views) == 1 and set(wanted(views[0])) == {UID}
        assert before is not None and source.last_error is None
        # A burst (a relist) of changes within one loop iteration: one view.
        for i in range(50):
            source._on_pod(
                Event.MODIFIED, "travel/pricing", None, pod_obj(metadata__labels={"i": str(i)})
            )
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(views) == 2 and views[1].pods[UID].labels["i"] == "49"
        # Nothing changed: no view.
        source._on_pod(
            Event.MODIFIED, "travel/pricing", None, pod_obj(metadata__labels={"i": "49"})
        )
        await asyncio.sleep(0)
        assert len(views) == 2

    asyncio.run(scenario())


def test_mock_informer_bad_object_keeps_the_last_reading_and_delete_releases() -> None:
    async def scenario() -> None:
        source, views = hand_fed_source()
        source._first_publish()
        source._on_pod(Event.ADDED, "travel/pricing", None, pod_obj())
        source._on_pod(Event.MODIFIED, "travel/pricing", None, pod_obj(status__podIP="bogus"))
        await asyncio.sleep(0)
        assert source.view().pods[UID].ip == IPv4Address("10.1.0.5")
        # Another node's pod (the field selector should not let it through) is never held.
        other = pod_obj(spec__nodeName="n2")
        other["metadata"]["uid"] = "6c120c3c-7710-49ac-b107-6a46b3c02071"
        source._on_pod(Event.ADDED, "travel/other", None, other)
        assert set(source.view().pods) == {UID}
        source._on_pod(Event.DELETED, "travel/pricing", pod_obj(), None)
        await asyncio.sleep(0)
        assert views[-1].pods == {}

    asyncio.run(scenario())
