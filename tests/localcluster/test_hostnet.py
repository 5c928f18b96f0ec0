"""The host of a local Kubernetes cluster: what pods see of it, its objects and routes (pure)."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from localcluster.kube import hostnet
from localcluster.kube.apiserver import SERVICE_CIDR, kubernetes_service_ip, write_pki
from localcluster.kube.podplan import service_info
from localcluster.kube.proxyplan import listed_endpoints, service_rules
from localcluster.network import plan_host_network, plan_layout
from localcluster.spec import parse_cluster

CLUSTER = (
    "search ns1.svc.cluster.local svc.cluster.local cluster.local\n"
    "nameserver 10.10.0.1\n"
    "options ndots:5\n"
)


@pytest.mark.parametrize(
    ("policy", "host_network", "dns_config", "want"),
    [
        ("ClusterFirst", False, None, CLUSTER),
        ("", False, None, CLUSTER),  # the API's default policy
        ("ClusterFirstWithHostNet", True, None, CLUSTER),
        ("ClusterFirstWithHostNet", False, None, CLUSTER),
        # ClusterFirst on the host network falls back to Default, as in Kubernetes.
        ("ClusterFirst", True, None, "nameserver 10.10.0.1\n"),
        ("Default", False, None, "nameserver 10.10.0.1\n"),
        ("None", False, None, ""),
        (
            "None",
            False,
            {
                "nameservers": ["10.10.0.1"],
                "searches": ["a.example"],
                "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}],
            },
            "search a.example\nnameserver 10.10.0.1\noptions ndots:2 edns0\n",
        ),
        (
            "ClusterFirst",
            False,
            {
                "nameservers": ["10.10.0.1", "192.0.2.53"],
                "searches": ["svc.cluster.local", "corp.example"],
                "options": [{"name": "ndots", "value": "1"}, {"name": "single-request"}],
            },
            "search ns1.svc.cluster.local svc.cluster.local cluster.local corp.example\n"
            "nameserver 10.10.0.1\nnameserver 192.0.2.53\n"
            "options ndots:1 single-request\n",
        ),
        (
            "ClusterFirst",
            False,
            {"searches": [f"d{i}.example" for i in range(5)], "nameservers": ["1", "2", "3"]},
            "search ns1.svc.cluster.local svc.cluster.local cluster.local "
            "d0.example d1.example d2.example\n"
            "nameserver 10.10.0.1\nnameserver 1\nnameserver 2\noptions ndots:5\n",
        ),
    ],
)
def test_resolv_conf(policy: str, host_network: bool, dns_config: Any, want: str) -> None:
    assert hostnet.resolv_conf("ns1", policy, host_network, dns_config) == want


def test_resolv_conf_search_path_is_the_pods_namespace() -> None:
    text = hostnet.resolv_conf("istio-system", "ClusterFirst", False)
    assert text.splitlines()[0] == (
        "search istio-system.svc.cluster.local svc.cluster.local cluster.local"
    )


@pytest.mark.parametrize(
    ("hostname", "ip", "last"),
    [("web-0", "10.244.1.10", "10.244.1.10\tweb-0"), ("n1", "10.10.0.11", "10.10.0.11\tn1")],
)
def test_hosts_file(hostname: str, ip: str, last: str) -> None:
    lines = hostnet.hosts_file(hostname, ip).splitlines()
    assert lines[0] == "# Kubernetes-managed hosts file."
    assert lines[1] == "127.0.0.1\tlocalhost"
    assert lines[2] == "::1\tlocalhost ip6-localhost ip6-loopback"
    assert lines[-1] == last
    assert len(lines) == 8


def test_kubernetes_service_ip_is_the_first_of_the_api_servers_range() -> None:
    assert kubernetes_service_ip() == hostnet.KUBERNETES_SERVICE_IP
    assert IPv4Network(SERVICE_CIDR)[1] == hostnet.KUBERNETES_SERVICE_IP
    assert hostnet.DNS_SERVICE_IP in IPv4Network(SERVICE_CIDR)


def test_serving_certificate_names_the_in_cluster_addresses(tmp_path: Path) -> None:
    from cryptography import x509

    write_pki(tmp_path)
    cert = x509.load_pem_x509_certificate((tmp_path / "apiserver.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.96.0.1") in san.get_values_for_type(x509.IPAddress)
    names = set(san.get_values_for_type(x509.DNSName))
    for name in (
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ):
        assert name in names


def _service(obj: dict[str, Any]) -> Any:
    return service_info(obj)


def test_host_objects_lead_the_services_vips_to_the_host() -> None:
    """The Service objects as the API server holds them (the kubernetes one with its own
    loopback port as targetPort), the Endpoints the kubelet writes: the DNAT goes to
    10.10.0.1:6443 and :53 over both protocols."""
    kubernetes = _service(
        {
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {
                "clusterIP": "10.96.0.1",
                "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 39123}],
            },
        }
    )
    dns = _service(hostnet.dns_service())
    listed = [
        listed_endpoints(hostnet.kubernetes_endpoints()),
        listed_endpoints(hostnet.dns_endpoints()),
    ]
    text = service_rules([kubernetes, dns], [], IPv4Network("10.244.1.0/24"), listed)
    lines = text.splitlines()
    assert [line for line in lines if "10.96.0.1/32" in line] == [
        "-A AMB-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -m comment --comment "
        '"default/kubernetes:443/tcp" -j DNAT --to-destination 10.10.0.1:6443'
    ]
    dns_rules = [line for line in lines if "10.96.0.10/32" in line]
    assert len(dns_rules) == 2
    assert "-p udp -m udp --dport 53" in dns_rules[0] and "10.10.0.1:53" in dns_rules[0]
    assert "-p tcp -m tcp --dport 53" in dns_rules[1] and "10.10.0.1:53" in dns_rules[1]
    assert hostnet.dns_service()["spec"]["clusterIP"] == "10.96.0.10"


def test_selectorless_service_pairs_ports_by_name_and_protocol() -> None:
    svc = _service(
        {
            "metadata": {"name": "ext", "namespace": "n"},
            "spec": {
                "clusterIP": "10.96.5.5",
                "ports": [
                    {"name": "a", "port": 80, "targetPort": 1},
                    {"name": "b", "port": 81, "protocol": "UDP"},
                    {"name": "c", "port": 82, "protocol": "SCTP"},
                ],
            },
        }
    )
    eps = listed_endpoints(
        {
            "metadata": {"name": "ext", "namespace": "n"},
            "subsets": [
                {
                    "addresses": [{"ip": "10.244.1.5"}, {"ip": "10.244.2.5"}],
                    "notReadyAddresses": [{"ip": "10.244.3.5"}],
                    "ports": [
                        {"name": "a", "port": 8080},
                        {"name": "b", "port": 8181, "protocol": "UDP"},
                        {"name": "b", "port": 9999, "protocol": "TCP"},
                    ],
                },
                "junk",
                {"addresses": [{"ip": "10.244.4.5"}], "ports": [{"name": "a"}]},
            ],
        }
    )
    text = service_rules([svc], [], IPv4Network("10.244.1.0/24"), [eps])
    lines = text.splitlines()
    a = [line for line in lines if "--dport 80 " in line]
    assert len(a) == 2 and "10.244.1.5:8080" in a[0] and "10.244.2.5:8080" in a[1]
    assert "probability 0.5" in a[0]
    b = [line for line in lines if "--dport 81 " in line]
    assert len(b) == 2 and all("-p udp" in line and ":8181" in line for line in b)
    assert "9999" not in text and "10.244.3.5" not in text and "10.244.4.5" not in text
    assert "--dport 82" not in text
    # A Service with a selector ignores an Endpoints object of its name (pods decide).
    selected = _service(
        {
            "metadata": {"name": "ext", "namespace": "n"},
            "spec": {"clusterIP": "10.96.5.5", "selector": {"x": "y"}, "ports": [{"port": 80}]},
        }
    )
    assert "-j DNAT" not in service_rules([selected], [], IPv4Network("10.244.1.0/24"), [eps])


def _layout() -> Any:
    spec = parse_cluster("name: h\nnodes:\n  - name: n1\n  - name: n2\n", Path("."))
    return plan_layout(spec)


def test_host_network_plan_routes_every_nodes_pods_via_the_node() -> None:
    plan = plan_host_network(_layout(), hostnet.HOST_ADDRESS, hostnet.HOST_PREFIXLEN)
    assert plan.address == IPv4Address("10.10.0.1") and plan.prefixlen == 24
    assert plan.routes == (
        (IPv4Network("10.244.1.0/24"), IPv4Address("10.10.0.11")),
        (IPv4Network("10.244.2.0/24"), IPv4Address("10.10.0.12")),
    )


@pytest.mark.parametrize(
    ("address", "prefix", "why"),
    [
        ("10.10.0.11", 24, "a node's"),
        ("10.10.0.0", 24, "not a host"),
        ("10.10.1.1", 24, "does not share"),
    ],
)
def test_host_network_plan_refuses_a_bad_address(address: str, prefix: int, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        plan_host_network(_layout(), IPv4Address(address), prefix)
