"""Service VIPs for Kubernetes Services, kube-proxy style: the DNAT rules of one node (pure).

A Service with a ClusterIP and a selector gets, per TCP or UDP port, one DNAT rule per
ready endpoint (a Running, Ready pod of its namespace whose labels match, with an IP),
chosen uniformly at random, in the same chains as the cluster-file services
(`localcluster.network`): declaring the chain flushes it, so applying the text again
replaces the rules. A `targetPort` naming a container port is resolved per pod, as
kube-proxy does through the Endpoints object; a pod without that port is no endpoint.
A Service without a selector takes its endpoints from its Endpoints object (what
`default/kubernetes` and `kube-system/kube-dns` are: the kubelet writes theirs), each
Service port paired with the Endpoints ports of the same name and protocol, as kube-proxy
pairs them. A Service with no ready endpoint gets no rule (its VIP answers nothing, as with
kube-proxy's iptables mode before it learned to reject).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

from localcluster.kube.podplan import ServiceInfo
from localcluster.network import NODE_BRIDGE, POSTROUTING_CHAIN, SERVICES_CHAIN


@dataclass(frozen=True, slots=True)
class Endpoint:
    namespace: str
    name: str
    labels: tuple[tuple[str, str], ...]
    ip: str
    ports: tuple[tuple[str, int], ...]  # named container ports


def endpoint_of(pod: Mapping[str, Any]) -> Endpoint | None:
    """The pod as a service endpoint, or None if it is not one now (not Running and Ready,
    no IP, or being deleted)."""
    md = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if md.get("deletionTimestamp") or status.get("phase") != "Running" or not status.get("podIP"):
        return None
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
        if isinstance(c, dict)
    )
    if not ready:
        return None
    ports: list[tuple[str, int]] = []
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in (c or {}).get("ports") or []:
            named = isinstance(p, dict) and isinstance(p.get("name"), str)
            if named and isinstance(p.get("containerPort"), int):
                ports.append((p["name"], p["containerPort"]))
    labels = md.get("labels") or {}
    return Endpoint(
        namespace=str(md.get("namespace", "default")),
        name=str(md.get("name", "")),
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
        ip=str(status["podIP"]),
        ports=tuple(ports),
    )


@dataclass(frozen=True, slots=True)
class ListedEndpoints:
    """The ready addresses of an Endpoints object, with its ports (name, port, protocol)."""

    namespace: str
    name: str
    subsets: tuple[tuple[tuple[str, ...], tuple[tuple[str, int, str], ...]], ...]

    def targets(self, port_name: str, protocol: str) -> list[tuple[str, int]]:
        return [
            (ip, number)
            for ips, ports in self.subsets
            for name, number, proto in ports
            if name == port_name and proto == protocol
            for ip in ips
        ]


def listed_endpoints(obj: Mapping[str, Any]) -> ListedEndpoints:
    """An Endpoints object as the proxy reads it: `addresses` only (notReadyAddresses take
    no traffic), ports without a number dropped."""
    md = obj.get("metadata") or {}
    subsets: list[tuple[tuple[str, ...], tuple[tuple[str, int, str], ...]]] = []
    for sub in obj.get("subsets") or []:
        if not isinstance(sub, dict):
            continue
        ips = tuple(
            str(a["ip"])
            for a in sub.get("addresses") or []
            if isinstance(a, dict) and isinstance(a.get("ip"), str)
        )
        ports = tuple(
            (str(p.get("name", "")), p["port"], str(p.get("protocol", "TCP")).upper())
            for p in sub.get("ports") or []
            if isinstance(p, dict) and isinstance(p.get("port"), int)
        )
        if ips and ports:
            subsets.append((ips, ports))
    return ListedEndpoints(
        str(md.get("namespace", "default")), str(md.get("name", "")), tuple(subsets)
    )


def selects(svc: ServiceInfo, ep: Endpoint) -> bool:
    if not svc.selector or ep.namespace != svc.namespace:
        return False
    labels = dict(ep.labels)
    return all(labels.get(k) == v for k, v in svc.selector)


def _target(port: int | str, ep: Endpoint) -> int | None:
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    return dict(ep.ports).get(port)


PROTOCOLS = frozenset({"TCP", "UDP"})


def service_rules(
    services: Sequence[ServiceInfo],
    endpoints: Sequence[Endpoint],
    pod_cidr: IPv4Network,
    listed: Sequence[ListedEndpoints] = (),
) -> str:
    """iptables-restore input (for --noflush) with every Service's DNAT on a node whose
    pods are in `pod_cidr`; `listed` are the Endpoints objects, used for the Services
    without a selector. Deterministic: same input, same text (so unchanged rules are not
    reapplied)."""
    lines = ["*nat", f":{SERVICES_CHAIN} - [0:0]", f":{POSTROUTING_CHAIN} - [0:0]"]
    ordered = sorted(endpoints, key=lambda e: (e.namespace, e.name, e.ip))
    by_name = {(e.namespace, e.name): e for e in listed}
    for svc in sorted(services, key=lambda s: (s.namespace, s.name)):
        if not svc.has_vip:
            continue
        members = [ep for ep in ordered if selects(svc, ep)]
        own = by_name.get((svc.namespace, svc.name)) if not svc.selector else None
        for port in svc.ports:
            protocol = port.protocol.upper()
            if protocol not in PROTOCOLS:
                continue
            p = protocol.lower()
            match = f"-A {SERVICES_CHAIN} -d {svc.cluster_ip}/32 -p {p} -m {p} --dport {port.port}"
            comment = f'-m comment --comment "{svc.namespace}/{svc.name}:{port.port}/{p}"'
            targets: list[tuple[str, int]] = (
                own.targets(port.name, protocol)
                if own is not None
                else [(ep.ip, t) for ep in members if (t := _target(port.target_port, ep))]
            )
            for j, (ip, target) in enumerate(targets):
                remaining = len(targets) - j
                # Rule j takes 1/(n-j) of what the rules before it left: a uniform choice.
                pick = (
                    f"-m statistic --mode random --probability {1 / remaining:.10f} "
                    if remaining > 1
                    else ""
                )
                lines.append(f"{match} {comment} {pick}-j DNAT --to-destination {ip}:{target}")
    # Hairpin (see localcluster.network.service_rules): replies must pass the node.
    lines.append(
        f"-A {POSTROUTING_CHAIN} -s {pod_cidr} -o {NODE_BRIDGE} "
        "-m conntrack --ctstate DNAT -j MASQUERADE"
    )
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
