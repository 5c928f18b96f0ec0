"""Service VIPs for Kubernetes Services, kube-proxy style: the DNAT rules of one node (pure).

A Service with a ClusterIP and a selector gets, per TCP port, one DNAT rule per ready
endpoint (a Running, Ready pod of its namespace whose labels match, with an IP), chosen
uniformly at random, in the same chains as the cluster-file services
(`localcluster.network`): declaring the chain flushes it, so applying the text again
replaces the rules. A `targetPort` naming a container port is resolved per pod, as
kube-proxy does through the Endpoints object; a pod without that port is no endpoint.
A Service with no ready endpoint gets no rule (its VIP answers nothing, as with
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


def service_rules(
    services: Sequence[ServiceInfo], endpoints: Sequence[Endpoint], pod_cidr: IPv4Network
) -> str:
    """iptables-restore input (for --noflush) with every Service's DNAT on a node whose
    pods are in `pod_cidr`. Deterministic: same input, same text (so unchanged rules are
    not reapplied)."""
    lines = ["*nat", f":{SERVICES_CHAIN} - [0:0]", f":{POSTROUTING_CHAIN} - [0:0]"]
    ordered = sorted(endpoints, key=lambda e: (e.namespace, e.name, e.ip))
    for svc in sorted(services, key=lambda s: (s.namespace, s.name)):
        if not svc.has_vip:
            continue
        members = [ep for ep in ordered if selects(svc, ep)]
        for port in svc.ports:
            if port.protocol.upper() != "TCP":
                continue
            match = f"-A {SERVICES_CHAIN} -d {svc.cluster_ip}/32 -p tcp -m tcp --dport {port.port}"
            comment = f'-m comment --comment "{svc.namespace}/{svc.name}:{port.port}"'
            targets = [(ep, t) for ep in members if (t := _target(port.target_port, ep))]
            for j, (ep, target) in enumerate(targets):
                remaining = len(targets) - j
                # Rule j takes 1/(n-j) of what the rules before it left: a uniform choice.
                pick = (
                    f"-m statistic --mode random --probability {1 / remaining:.10f} "
                    if remaining > 1
                    else ""
                )
                lines.append(f"{match} {comment} {pick}-j DNAT --to-destination {ep.ip}:{target}")
    # Hairpin (see localcluster.network.service_rules): replies must pass the node.
    lines.append(
        f"-A {POSTROUTING_CHAIN} -s {pod_cidr} -o {NODE_BRIDGE} "
        "-m conntrack --ctstate DNAT -j MASQUERADE"
    )
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
