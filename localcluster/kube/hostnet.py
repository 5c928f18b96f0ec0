"""The host inside a local Kubernetes cluster: its address, ports and the pods' view of it (pure).

The kubelet serves two things on `HOST_ADDRESS`, an address of the cluster bridge br0 in
the cluster netns (`localcluster.kube.hostside` opens the sockets there):
- the API server on `APISERVER_PORT`, forwarded to the real kube-apiserver on loopback;
  `default/kubernetes` (ClusterIP `KUBERNETES_SERVICE_IP`, port 443) has its Endpoints here;
- the cluster DNS on `DNS_PORT` (UDP and TCP), the names of `CLUSTER_DOMAIN`;
  `kube-system/kube-dns` (ClusterIP `DNS_SERVICE_IP`) has its Endpoints here.

The text a pod sees of them (`/etc/resolv.conf`, `/etc/hosts`) and the API objects the
kubelet writes for them are built here; nothing in this module does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address
from typing import Any

HOST_ADDRESS = IPv4Address("10.10.0.1")
HOST_PREFIXLEN = 24  # the cluster bridge's network, 10.10.0.0/24 (nodes are .11 and up)
APISERVER_PORT = 6443
DNS_PORT = 53
CLUSTER_DOMAIN = "cluster.local"
# The first address of the API server's service CIDR (localcluster.kube.apiserver's
# SERVICE_CIDR): the API server gives it to `default/kubernetes` itself.
KUBERNETES_SERVICE_IP = IPv4Address("10.96.0.1")
DNS_SERVICE_IP = IPv4Address("10.96.0.10")  # what kubeadm picks: the 10th of the range
DNS_SERVICE_NAMESPACE = "kube-system"
DNS_SERVICE_NAME = "kube-dns"
NDOTS = 5
# glibc reads at most 6 search domains and 3 nameservers (Kubernetes enforces the same).
MAX_SEARCHES = 6
MAX_NAMESERVERS = 3

DNS_POLICIES = frozenset({"ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"})


def uses_cluster_dns(dns_policy: str, host_network: bool) -> bool:
    """Kubernetes' rule: ClusterFirst means the cluster DNS unless the pod is hostNetwork
    (then it is Default); ClusterFirstWithHostNet means it always. An empty policy is the
    API's default, ClusterFirst."""
    policy = dns_policy or "ClusterFirst"
    if policy == "ClusterFirstWithHostNet":
        return True
    return policy == "ClusterFirst" and not host_network


def cluster_searches(namespace: str) -> tuple[str, ...]:
    return (
        f"{namespace}.svc.{CLUSTER_DOMAIN}",
        f"svc.{CLUSTER_DOMAIN}",
        CLUSTER_DOMAIN,
    )


def resolv_conf(
    namespace: str,
    dns_policy: str,
    host_network: bool,
    dns_config: Mapping[str, Any] | None = None,
) -> str:
    """The pod's /etc/resolv.conf.

    Cluster DNS (see `uses_cluster_dns`): the namespace's search path, the host's DNS,
    ndots:5. `Default` would be the node's own resolver; a local node has none but the
    host's (nothing leaves the machine), so it is that server without the cluster's search
    path. `None` is the pod's `dnsConfig` alone. A `dnsConfig` (`nameservers`, `searches`,
    `options` with `name`/`value`) is merged as the kubelet does: its servers and domains
    after the policy's (duplicates dropped, at most 3 and 6), its options replacing the
    policy's of the same name.
    """
    nameservers: list[str] = []
    searches: list[str] = []
    options: dict[str, str | None] = {}
    policy = dns_policy or "ClusterFirst"
    if uses_cluster_dns(policy, host_network):
        nameservers.append(str(HOST_ADDRESS))
        searches.extend(cluster_searches(namespace))
        options["ndots"] = str(NDOTS)
    elif policy != "None":
        nameservers.append(str(HOST_ADDRESS))
    cfg = dns_config or {}
    for server in _strings(cfg.get("nameservers")):
        if server not in nameservers:
            nameservers.append(server)
    for domain in _strings(cfg.get("searches")):
        if domain not in searches:
            searches.append(domain)
    for opt in cfg.get("options") or []:
        if isinstance(opt, Mapping) and isinstance(opt.get("name"), str) and opt["name"]:
            value = opt.get("value")
            options[opt["name"]] = str(value) if value is not None else None
    lines: list[str] = []
    if searches:
        lines.append("search " + " ".join(searches[:MAX_SEARCHES]))
    lines += [f"nameserver {s}" for s in nameservers[:MAX_NAMESERVERS]]
    if options:
        words = [k if v is None else f"{k}:{v}" for k, v in options.items()]
        lines.append("options " + " ".join(words))
    return "".join(line + "\n" for line in lines)


def _strings(v: Any) -> list[str]:
    return [str(x) for x in v if isinstance(x, str) and x] if isinstance(v, list) else []


MANAGED_HOSTS_HEADER = "# Kubernetes-managed hosts file.\n"


def hosts_file(hostname: str, pod_ip: str) -> str:
    """The pod's /etc/hosts as the kubelet writes it: localhost lines, then the pod's own
    address and name, tab-separated."""
    return (
        MANAGED_HOSTS_HEADER
        + "127.0.0.1\tlocalhost\n"
        + "::1\tlocalhost ip6-localhost ip6-loopback\n"
        + "fe00::0\tip6-localnet\n"
        + "fe00::0\tip6-mcastprefix\n"
        + "fe00::1\tip6-allnodes\n"
        + "fe00::2\tip6-allrouters\n"
        + f"{pod_ip}\t{hostname}\n"
    )


# --- the API objects that point the cluster at the host -------------------------------------


def _port(name: str, port: int, protocol: str) -> dict[str, Any]:
    return {"name": name, "port": port, "protocol": protocol}


def endpoints_object(
    namespace: str, name: str, ports: Sequence[tuple[str, int, str]], labels: Mapping[str, str]
) -> dict[str, Any]:
    """An Endpoints object with the host as its one address."""
    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "subsets": [
            {
                "addresses": [{"ip": str(HOST_ADDRESS)}],
                "ports": [_port(n, p, proto) for n, p, proto in ports],
            }
        ],
    }


def kubernetes_endpoints() -> dict[str, Any]:
    """`default/kubernetes`: the API server's Service. The API server names its one port
    `https`; an Endpoints port pairs with the Service port of the same name, so 443 on the
    ClusterIP leads to APISERVER_PORT here whatever targetPort the Service shows (the API
    server writes its own loopback port there; with --endpoint-reconciler-type=none it
    leaves the Endpoints to us)."""
    return endpoints_object(
        "default",
        "kubernetes",
        [("https", APISERVER_PORT, "TCP")],
        {},
    )


DNS_LABELS = {
    "k8s-app": "kube-dns",
    "kubernetes.io/cluster-service": "true",
    "kubernetes.io/name": "KubeDNS",
}


def dns_service() -> dict[str, Any]:
    """`kube-system/kube-dns` as kubeadm creates it, without a selector (no DNS pod: the
    host answers), so its Endpoints are ours to write."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": DNS_SERVICE_NAME,
            "namespace": DNS_SERVICE_NAMESPACE,
            "labels": dict(DNS_LABELS),
        },
        "spec": {
            "clusterIP": str(DNS_SERVICE_IP),
            "ports": [
                {"name": "dns", "port": DNS_PORT, "protocol": "UDP", "targetPort": DNS_PORT},
                {"name": "dns-tcp", "port": DNS_PORT, "protocol": "TCP", "targetPort": DNS_PORT},
            ],
        },
    }


def dns_endpoints() -> dict[str, Any]:
    return endpoints_object(
        DNS_SERVICE_NAMESPACE,
        DNS_SERVICE_NAME,
        [("dns", DNS_PORT, "UDP"), ("dns-tcp", DNS_PORT, "TCP")],
        DNS_LABELS,
    )
