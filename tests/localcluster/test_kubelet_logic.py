"""The local kubelet's pure decisions: pod plans, environment, addresses, status, VIP rules."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from localcluster.kube import ipam
from localcluster.kube.nodeobj import node_object, node_status
from localcluster.kube.podplan import (
    Probe,
    ServiceInfo,
    ServicePortInfo,
    container_argv,
    container_env,
    expand,
    plan_pod,
    service_info,
)
from localcluster.kube.podstatus import (
    ContainerState,
    PodView,
    after_exit,
    pod_status,
    restart_delay,
)
from localcluster.kube.proxyplan import Endpoint, endpoint_of, service_rules

UID = "0123abcd-4567-89ef-0123-456789abcdef"


def pod(container: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    c = {
        "name": "app",
        "image": "img:1",
        "command": ["python", "app.py"],
        "args": ["--port", "8080"],
    }
    c.update(container or {})
    return {
        "metadata": {"name": "web-1", "namespace": "shop", "uid": UID},
        "spec": {"nodeName": "node1", "containers": [c], **spec},
    }


def test_plan_reads_command_args_probe_and_policy() -> None:
    plan = plan_pod(
        pod(
            {
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {
                    "httpGet": {"path": "/healthz", "port": "http"},
                    "periodSeconds": 2,
                    "initialDelaySeconds": 1,
                },
            },
            restartPolicy="OnFailure",
            terminationGracePeriodSeconds=7,
            serviceAccountName="web",
        )
    )
    assert plan.problem == ""
    assert plan.command == ("python", "app.py", "--port", "8080")
    assert plan.readiness == Probe("httpGet", 8080, "/healthz", "", 1.0, 2.0, 1.0, 1, 3)
    assert (plan.restart_policy, plan.grace_s, plan.service_account) == ("OnFailure", 7.0, "web")
    assert plan.key == "shop/web-1" and plan.node == "node1" and not plan.host_network


@pytest.mark.parametrize(
    ("container", "spec", "problem"),
    [
        ({"command": None, "args": None}, {}, "has no command"),
        ({"readinessProbe": {"exec": {}}}, {}, "only httpGet and tcpSocket"),
        ({"readinessProbe": {"tcpSocket": {"port": "nope"}}}, {}, "no container port named"),
        ({"readinessProbe": {"tcpSocket": {"port": 70000}}}, {}, "out of range"),
        (
            {"env": [{"name": "X", "valueFrom": {"resourceFieldRef": {"resource": "cpu"}}}]},
            {},
            "valueFrom supports configMapKeyRef, secretKeyRef and fieldRef",
        ),
        ({}, {"restartPolicy": "Sometimes"}, "restartPolicy"),
        ({}, {"initContainers": [{"name": "i"}]}, "only one container"),
    ],
)
def test_plan_names_what_cannot_run(
    container: dict[str, Any], spec: dict[str, Any], problem: str
) -> None:
    plan = plan_pod(pod(container, **spec))
    assert problem in plan.problem


def test_plan_of_a_pod_without_containers_is_a_problem_not_a_crash() -> None:
    assert "empty" in plan_pod({"metadata": {"uid": UID}, "spec": {}}).problem


def test_env_services_of_the_namespace_then_container_env_with_expansion() -> None:
    services = [
        ServiceInfo("shop", "cart-db", "10.96.0.20", (), (ServicePortInfo("sql", 5432, 5432),)),
        ServiceInfo("other", "elsewhere", "10.96.0.30", (), (ServicePortInfo("", 80, 80),)),
        ServiceInfo("shop", "headless", "None", (), (ServicePortInfo("", 80, 80),)),
        ServiceInfo(
            "default", "kubernetes", "10.96.0.1", (), (ServicePortInfo("https", 443, 6443),)
        ),
    ]
    plan = plan_pod(
        pod(
            {
                "env": [
                    {"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {
                        "name": "URL",
                        "value": "http://$(CART_DB_SERVICE_HOST):$(CART_DB_SERVICE_PORT)",
                    },
                    {"name": "LIT", "value": "$$(ME) $(UNSET)"},
                    {"name": "CART_DB_SERVICE_PORT", "value": "1"},
                ]
            }
        )
    )
    env = container_env(plan, services, "10.244.1.10", "10.10.0.11")
    assert env["ME"] == "web-1" and env["IP"] == "10.244.1.10"
    assert env["URL"] == "http://10.96.0.20:5432"
    assert env["LIT"] == "$(ME) $(UNSET)"
    assert env["CART_DB_SERVICE_PORT"] == "1"  # the container's own wins
    assert env["CART_DB_SERVICE_PORT_SQL"] == "5432"
    assert env["CART_DB_PORT_5432_TCP_ADDR"] == "10.96.0.20"
    assert env["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"
    assert "ELSEWHERE_SERVICE_HOST" not in env and "HEADLESS_SERVICE_HOST" not in env


def test_argv_expands_and_maps_python_to_the_interpreter() -> None:
    plan = plan_pod(pod({"args": ["--name", "$(ME)"]}))
    assert container_argv(plan, {"ME": "x"}, "/venv/bin/python") == [
        "/venv/bin/python",
        "app.py",
        "--name",
        "x",
    ]
    assert expand("$(A)$$(A)$(B)", {"A": "1"}) == "1$(A)$(B)"


def test_addresses_skip_gateway_reserved_and_taken() -> None:
    cidr = IPv4Network("10.244.1.0/24")
    gw = IPv4Address("10.244.1.1")
    assert ipam.allocate(cidr, gw, set()) == IPv4Address("10.244.1.10")
    taken = {IPv4Address("10.244.1.10"), IPv4Address("10.244.1.11")}
    assert ipam.allocate(cidr, gw, taken) == IPv4Address("10.244.1.12")
    full = {IPv4Address(f"10.244.1.{i}") for i in range(10, 255)}
    with pytest.raises(ipam.AddressesExhausted, match=r"10\.244\.1\.0/24"):
        ipam.allocate(cidr, gw, full)


@pytest.mark.parametrize(
    ("policy", "code", "restart", "phase"),
    [
        ("Always", 0, True, "Running"),
        ("Always", 1, True, "Running"),
        ("OnFailure", 0, False, "Succeeded"),
        ("OnFailure", 2, True, "Running"),
        ("Never", 0, False, "Succeeded"),
        ("Never", 3, False, "Failed"),
    ],
)
def test_after_exit(policy: str, code: int, restart: bool, phase: str) -> None:
    out = after_exit(policy, code)
    assert (out.restart, out.phase) == (restart, phase)


def test_restart_backoff_doubles_and_caps() -> None:
    assert [restart_delay(n) for n in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert restart_delay(50) == 60.0


def test_status_ready_only_when_running_and_probed() -> None:
    plan = plan_pod(pod())
    view = PodView(
        plan,
        "Running",
        "10.244.1.10",
        "10.10.0.11",
        "2026-01-01T00:00:00Z",
        ContainerState("running", started_at="2026-01-01T00:00:00Z"),
        None,
        ready=False,
        restarts=0,
    )
    st = pod_status(view)["status"]
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert conds["Ready"] == "False" and st["podIPs"] == [{"ip": "10.244.1.10"}]
    assert st["containerStatuses"][0]["state"] == {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
    ready = pod_status(
        PodView(**{**{f: getattr(view, f) for f in PodView.__slots__}, "ready": True})
    )
    assert {c["type"]: c["status"] for c in ready["status"]["conditions"]}["Ready"] == "True"


def test_node_object_and_status() -> None:
    obj = node_object("node1", IPv4Address("10.10.0.11"), IPv4Network("10.244.1.0/24"))
    assert obj["metadata"]["labels"]["kubernetes.io/hostname"] == "node1"
    assert obj["spec"]["podCIDR"] == "10.244.1.0/24"
    st = node_status("node1", IPv4Address("10.10.0.11"), "t1", "t0")["status"]
    assert {"type": "InternalIP", "address": "10.10.0.11"} in st["addresses"]
    assert [c["status"] for c in st["conditions"] if c["type"] == "Ready"] == ["True"]


def api_pod(
    name: str, labels: dict[str, str], ip: str, ready: bool = True, **md: Any
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "shop", "labels": labels, **md},
        "spec": {"containers": [{"ports": [{"name": "web", "containerPort": 9090}]}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_endpoints_are_running_ready_not_deleting() -> None:
    assert endpoint_of(api_pod("a", {}, "10.244.1.10")) is not None
    assert endpoint_of(api_pod("a", {}, "10.244.1.10", ready=False)) is None
    assert endpoint_of(api_pod("a", {}, "")) is None
    assert endpoint_of(api_pod("a", {}, "10.244.1.10", deletionTimestamp="x")) is None


def test_service_rules_spread_over_matching_endpoints_and_resolve_named_ports() -> None:
    svc = service_info(
        {
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "clusterIP": "10.96.0.50",
                "selector": {"app": "web"},
                "ports": [{"port": 80, "targetPort": "web"}, {"port": 81, "targetPort": 8081}],
            },
        }
    )
    eps = [
        endpoint_of(api_pod("a", {"app": "web"}, "10.244.1.10")),
        endpoint_of(api_pod("b", {"app": "web"}, "10.244.2.10")),
        endpoint_of(api_pod("c", {"app": "db"}, "10.244.2.11")),
    ]
    text = service_rules(
        [svc], [e for e in eps if isinstance(e, Endpoint)], IPv4Network("10.244.1.0/24")
    )
    lines = text.splitlines()
    port80 = [line for line in lines if "--dport 80 " in line]
    assert len(port80) == 2
    assert "--probability 0.5000000000" in port80[0] and "10.244.1.10:9090" in port80[0]
    assert "probability" not in port80[1] and "10.244.2.10:9090" in port80[1]
    assert sum("--dport 81 " in line for line in lines) == 2
    assert "10.244.2.11" not in text
    assert "-s 10.244.1.0/24 -o cni0" in text and lines[-1] == "COMMIT"
    # Same input, same text: the kubelet reapplies only on a change.
    assert text == service_rules(
        [svc], [e for e in eps if isinstance(e, Endpoint)], IPv4Network("10.244.1.0/24")
    )
