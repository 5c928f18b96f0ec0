"""What a pod sees of its cluster: the kubelet's variables and the pod's resolver (pure)."""

from __future__ import annotations

import pytest

from localcluster.podenv import identity, pod_env, pod_resolv_conf
from localcluster.spec import SpecError, parse_cluster

from .test_spec import BASE, TRAVEL, travel


def test_pod_env_is_what_the_kubelet_writes():
    spec = travel()
    env = pod_env(spec, spec.pod("travel", "frontend-0"))
    assert env == {
        # Services of the pod's namespace, in name order, as the kubelet writes them.
        "BACK_END_SERVICE_HOST": "10.96.0.11",
        "BACK_END_SERVICE_PORT": "9090",
        "BACK_END_PORT": "tcp://10.96.0.11:9090",
        "BACK_END_PORT_9090_TCP": "tcp://10.96.0.11:9090",
        "BACK_END_PORT_9090_TCP_PROTO": "tcp",
        "BACK_END_PORT_9090_TCP_PORT": "9090",
        "BACK_END_PORT_9090_TCP_ADDR": "10.96.0.11",
        "BACK_END_PORT_9091_TCP": "tcp://10.96.0.11:9091",
        "BACK_END_PORT_9091_TCP_PROTO": "tcp",
        "BACK_END_PORT_9091_TCP_PORT": "9091",
        "BACK_END_PORT_9091_TCP_ADDR": "10.96.0.11",
        "FRONTEND_SERVICE_HOST": "10.96.0.10",
        "FRONTEND_SERVICE_PORT": "80",
        "FRONTEND_SERVICE_PORT_HTTP": "80",
        "FRONTEND_PORT": "tcp://10.96.0.10:80",
        "FRONTEND_PORT_80_TCP": "tcp://10.96.0.10:80",
        "FRONTEND_PORT_80_TCP_PROTO": "tcp",
        "FRONTEND_PORT_80_TCP_PORT": "80",
        "FRONTEND_PORT_80_TCP_ADDR": "10.96.0.10",
        "HOSTNAME": "frontend-0",
        "POD_NAME": "frontend-0",
        "POD_NAMESPACE": "travel",
        "POD_IP": "10.244.1.11",
        "NODE_NAME": "node1",
        "SERVICE_ACCOUNT": "frontend",
        "GREETING": "hi",
    }
    legacy = pod_env(spec, spec.pod("legacy", "old-0"))
    assert "FRONTEND_SERVICE_HOST" not in legacy
    assert legacy["SERVICE_ACCOUNT"] == "default"


def test_the_pods_own_env_wins():
    text = TRAVEL.replace("env: {GREETING: hi}", "env: {POD_NAME: mine, FRONTEND_SERVICE_HOST: x}")
    spec = parse_cluster(text, BASE)
    env = pod_env(spec, spec.pod("travel", "frontend-0"))
    assert env["POD_NAME"] == "mine"
    assert env["FRONTEND_SERVICE_HOST"] == "x"


def test_no_resolver_without_dns_capture():
    spec = travel()
    assert pod_resolv_conf(spec, spec.pod("travel", "frontend-0")) is None


def test_resolver_with_dns_capture():
    spec = parse_cluster(TRAVEL + "dns: {capture: true, nameservers: [10.244.2.53]}\n", BASE)
    assert pod_resolv_conf(spec, spec.pod("travel", "frontend-0")) == (
        "search travel.svc.cluster.local svc.cluster.local cluster.local\n"
        "nameserver 10.244.2.53\n"
        "options ndots:5\n"
    )


def test_identity():
    spec = travel()
    assert identity(spec, spec.pod("travel", "frontend-0")) == (
        "spiffe://cluster.local/ns/travel/sa/frontend"
    )


def test_restart_policy():
    spec = travel()
    assert spec.pod("travel", "frontend-0").restart_policy == "Never"
    text = TRAVEL.replace("env: {GREETING: hi}", "env: {GREETING: hi}\n    restartPolicy: Always")
    assert parse_cluster(text, BASE).pod("travel", "frontend-0").restart_policy == "Always"
    with pytest.raises(SpecError, match="restartPolicy: 'Sometimes' is not one of"):
        parse_cluster(text.replace("Always", "Sometimes"), BASE)
