"""The local-mode discovery document (LOCAL_XDS_PATH) derived from a ClusterSpec. Pure.

The output is plain data (dicts, lists, str, int) in the camelCase wire shape of
docs protocols.md "Workload discovery"; the caller serialises it as YAML. Service port maps
use int keys (service port -> target port), as the tunnel's local-file reader expects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from localcluster.spec import ClusterSpec, PodSpec, ServiceSpec

CANONICAL_NAME_LABEL = "service.istio.io/canonical-name"
CANONICAL_REVISION_LABEL = "service.istio.io/canonical-revision"
DEFAULT_NETWORK = ""  # single-network cluster: VIPs are written "/<ip>"


def local_xds(
    spec: ClusterSpec, policies: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """The whole document; `policies` (the ones applied since) replace the cluster file's."""
    return {
        "workloads": [workload(spec, pod) for pod in spec.pods],
        "services": [service(svc) for svc in spec.services],
        "policies": (
            [json.loads(p) for p in spec.policies]
            if policies is None
            else [dict(p) for p in policies]
        ),
    }


def workload_uid(spec: ClusterSpec, pod: PodSpec) -> str:
    return f"{spec.name}//Pod/{pod.namespace}/{pod.name}"


def canonical_name(pod: PodSpec) -> str:
    # The explicit Istio label wins over `app`, as in Istio's own derivation.
    return pod.labels.get(CANONICAL_NAME_LABEL) or pod.labels.get("app") or pod.name


def canonical_revision(pod: PodSpec) -> str:
    return pod.labels.get(CANONICAL_REVISION_LABEL) or pod.labels.get("version") or "latest"


def port_map(svc: ServiceSpec) -> dict[int, int]:
    return {p.port: p.target_port for p in svc.ports}


def workload(spec: ClusterSpec, pod: PodSpec) -> dict[str, Any]:
    return {
        "uid": workload_uid(spec, pod),
        "name": pod.name,
        "namespace": pod.namespace,
        "serviceAccount": pod.service_account,
        "trustDomain": spec.trust_domain,
        "workloadIps": [str(pod.ip)],
        "protocol": "HBONE" if pod.enrolled(spec) else "TCP",
        "node": pod.node,
        "canonicalName": canonical_name(pod),
        "canonicalRevision": canonical_revision(pod),
        "workloadName": pod.workload_name,
        "workloadType": "pod",
        "clusterId": spec.name,
        "status": "Healthy",
        "services": {f"{s.namespace}/{s.hostname}": port_map(s) for s in spec.services_for(pod)},
        "labels": dict(pod.labels),
    }


def service(svc: ServiceSpec) -> dict[str, Any]:
    return {
        "name": svc.name,
        "namespace": svc.namespace,
        "hostname": svc.hostname,
        "vips": [f"{DEFAULT_NETWORK}/{svc.vip}"],
        "ports": port_map(svc),
        "subjectAltNames": [],
    }
