"""Waypoint Gateways on Kubernetes: which Gateways are waypoints, and the objects istiod's
deployment controller makes for each. Pure: Kubernetes objects in, manifests out.

A waypoint is a Gateway of class `istio-waypoint` with a listener `{port: 15008, protocol:
HBONE}`. For each, the control plane owns (ownerReferences to the Gateway, so the garbage
collector removes them with it): a ServiceAccount `<name>`, a Deployment `<name>` of one
replica running `python -m waypoint` with the environment `waypoint/config.py` reads, and a
Service `<name>` (ClusterIP, ports 15021 status-port and 15008 mesh, as Istio's waypoint
Service) selecting the Deployment's pods by `gateway.networking.k8s.io/gateway-name`. Its
pods carry `istio.io/dataplane-mode: none`: a waypoint is never captured itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane.bindings import (
    DEFAULT_WAYPOINT_FOR,
    SAME_NAMESPACE,
    WAYPOINT_FOR,
    WAYPOINT_FOR_LABEL,
    AllowedNamespaces,
    allowed_namespaces,
)
from kube.kinds import DEPLOYMENT, GATEWAY, SERVICE, SERVICE_ACCOUNT
from meshcore import defaults

WAYPOINT_CLASS = "istio-waypoint"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
MANAGED_LABEL = "gateway.istio.io/managed"
MANAGED_VALUE = "istio.io-mesh-controller"
DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
FAIL_OPEN_ANNOTATION = "ambient-mesh.io/waypoint-fail-open"
HBONE_PROTOCOL = "HBONE"


@dataclass(frozen=True, slots=True)
class WaypointGateway:
    """A Gateway of class istio-waypoint as the mesh reads it; `problem` says why it cannot
    serve (then it is reported, and nothing is deployed for it)."""

    namespace: str
    name: str
    uid: str
    waypoint_for: str
    fail_open: bool
    generation: int
    problem: str | None = None
    # Who may bind from other namespaces (its HBONE listener's allowedRoutes.namespaces).
    allowed: AllowedNamespaces = SAME_NAMESPACE

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _strings(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(v, str)}


def is_waypoint_gateway(obj: Mapping[str, Any]) -> bool:
    spec = obj.get("spec")
    return isinstance(spec, Mapping) and spec.get("gatewayClassName") == WAYPOINT_CLASS


def read_gateway(obj: Mapping[str, Any]) -> WaypointGateway:
    """A waypoint Gateway (`is_waypoint_gateway` holds), with the problem if any."""
    meta = _meta(obj)
    labels = _strings(meta.get("labels"))
    annotations = _strings(meta.get("annotations"))
    problem = None
    waypoint_for = labels.get(WAYPOINT_FOR_LABEL, DEFAULT_WAYPOINT_FOR)
    if waypoint_for not in WAYPOINT_FOR:
        problem = f"label {WAYPOINT_FOR_LABEL}={waypoint_for!r} is not one of {WAYPOINT_FOR}"
        waypoint_for = "none"
    spec = obj.get("spec")
    listeners = spec.get("listeners") if isinstance(spec, Mapping) else None
    hbone = [
        listener
        for listener in (listeners if isinstance(listeners, list) else [])
        if isinstance(listener, Mapping)
        and listener.get("protocol") == HBONE_PROTOCOL
        and listener.get("port") == defaults.HBONE_PORT
    ]
    if not hbone and problem is None:
        problem = (
            f"a waypoint needs a listener {{name: mesh, port: {defaults.HBONE_PORT}, "
            f"protocol: {HBONE_PROTOCOL}}}"
        )
    allowed = SAME_NAMESPACE
    if hbone:
        try:
            allowed = allowed_namespaces(hbone[0])
        except ValueError as e:
            # Not understood: no other namespace may bind (it says why), its own still may.
            allowed = AllowedNamespaces(invalid=str(e))
    generation = meta.get("generation")
    return WaypointGateway(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        waypoint_for=waypoint_for,
        fail_open=annotations.get(FAIL_OPEN_ANNOTATION) == "true",
        generation=generation if isinstance(generation, int) else 0,
        problem=problem,
        allowed=allowed,
    )


ROOT_CERT_DIR = "/var/run/secrets/istio"
TOKEN_DIR = "/var/run/secrets/tokens"
# istio-proxy's uid, which upstream waypoints run as.
PROXY_UID = 1337


@dataclass(frozen=True, slots=True)
class WaypointTemplate:
    """What every waypoint Deployment shares: the image, and where the mesh's files are on
    the node (the mesh config the control plane writes, the CA socket, the token), mounted
    from the host at the same paths."""

    image: str = "ambient-mesh/waypoint:latest"
    xds_path: str = "/var/run/ambient-mesh/xds.yaml"
    ca_address: str = "/var/run/ambient-mesh/ca.sock"
    ca_token_path: str = "/var/run/ambient-mesh/token"
    host_dir: str = "/var/run/ambient-mesh"
    trust_domain: str = defaults.TRUST_DOMAIN
    extra_env: tuple[tuple[str, str], ...] = field(default=())
    # Set: the waypoint takes its config pushed over xDS from this address (verified with
    # this root) instead of reading `xds_path`.
    xds_address: str = ""
    xds_root_cert: str = ""
    # Set (in the cluster): the CA is istiod's gRPC CA at `ca_address` (host:port), checked
    # with this root from the `istio-ca-root-cert` ConfigMap, and the waypoint's credential
    # is its own projected service-account token; no host directory is mounted.
    ca_root_cert: str = ""

    @classmethod
    def in_cluster(
        cls, image: str, control_plane_namespace: str, trust_domain: str
    ) -> WaypointTemplate:
        istiod = f"istiod.{control_plane_namespace}.svc:15012"
        root = f"{ROOT_CERT_DIR}/root-cert.pem"
        return cls(
            image=image,
            xds_path="",
            ca_address=istiod,
            ca_token_path=f"{TOKEN_DIR}/istio-token",
            host_dir="",
            trust_domain=trust_domain,
            xds_address=istiod,
            xds_root_cert=root,
            ca_root_cert=root,
        )


def _owner(gw: WaypointGateway) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": GATEWAY.api_version,
            "kind": "Gateway",
            "name": gw.name,
            "uid": gw.uid,
            "controller": True,
        }
    ]


def _labels(gw: WaypointGateway) -> dict[str, str]:
    return {GATEWAY_NAME_LABEL: gw.name, MANAGED_LABEL: MANAGED_VALUE}


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def service_account(gw: WaypointGateway) -> dict[str, Any]:
    return {
        "apiVersion": SERVICE_ACCOUNT.api_version,
        "kind": "ServiceAccount",
        "metadata": {
            "name": gw.name,
            "namespace": gw.namespace,
            "labels": _labels(gw),
            "ownerReferences": _owner(gw),
        },
    }


def service(gw: WaypointGateway) -> dict[str, Any]:
    return {
        "apiVersion": SERVICE.api_version,
        "kind": "Service",
        "metadata": {
            "name": gw.name,
            "namespace": gw.namespace,
            "labels": _labels(gw),
            "ownerReferences": _owner(gw),
        },
        "spec": {
            "type": "ClusterIP",
            "selector": {GATEWAY_NAME_LABEL: gw.name},
            "ports": [
                {
                    "name": "status-port",
                    "port": defaults.READINESS_PORT,
                    "targetPort": defaults.READINESS_PORT,
                    "protocol": "TCP",
                    "appProtocol": "tcp",
                },
                {
                    "name": "mesh",
                    "port": defaults.HBONE_PORT,
                    "targetPort": defaults.HBONE_PORT,
                    "protocol": "TCP",
                },
            ],
        },
    }


def deployment(gw: WaypointGateway, template: WaypointTemplate) -> dict[str, Any]:
    pod_labels = {
        **_labels(gw),
        DATAPLANE_MODE_LABEL: "none",
        "service.istio.io/canonical-name": gw.name,
    }
    env: list[dict[str, Any]] = [
        {"name": "WAYPOINT_NAME", "value": gw.name},
        _field_env("POD_NAMESPACE", "metadata.namespace"),
        _field_env("NODE_NAME", "spec.nodeName"),
        _field_env("POD_IP", "status.podIP"),
        _field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        {"name": "TRUST_DOMAIN", "value": template.trust_domain},
        *(
            [
                {"name": "XDS_ADDRESS", "value": template.xds_address},
                {"name": "XDS_ROOT_CERT", "value": template.xds_root_cert},
            ]
            if template.xds_address
            else [{"name": "LOCAL_XDS_PATH", "value": template.xds_path}]
        ),
        {"name": "CA_ADDRESS", "value": template.ca_address},
        {"name": "CA_TOKEN_PATH", "value": template.ca_token_path},
        *(
            [{"name": "CA_ROOT_CERT", "value": template.ca_root_cert}]
            if template.ca_root_cert
            else []
        ),
        *({"name": k, "value": v} for k, v in template.extra_env),
    ]
    mounts, volumes = _volumes(template)
    container = {
        "name": "waypoint",
        "image": template.image,
        "command": ["python", "-m", "waypoint"],
        "env": env,
        "ports": [
            {"name": "mesh", "containerPort": defaults.HBONE_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": defaults.METRICS_PORT, "protocol": "TCP"},
            {"name": "status-port", "containerPort": defaults.READINESS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/healthz/ready", "port": defaults.READINESS_PORT},
            "periodSeconds": 2,
        },
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": gw.name,
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": volumes,
    }
    if template.ca_root_cert:
        # In the cluster, as upstream's waypoints: istio-proxy, nothing it does not need.
        container["securityContext"] = {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }
    return {
        "apiVersion": DEPLOYMENT.api_version,
        "kind": "Deployment",
        "metadata": {
            "name": gw.name,
            "namespace": gw.namespace,
            "labels": _labels(gw),
            "ownerReferences": _owner(gw),
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: gw.name}},
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }


def _volumes(template: WaypointTemplate) -> tuple[list[Any], list[Any]]:
    """(volumeMounts, volumes): the node's mesh directory (local cluster), or the projected
    CA token and the root certificate ConfigMap (in the cluster, as upstream's)."""
    if not template.ca_root_cert:
        return (
            [{"name": "mesh", "mountPath": template.host_dir}],
            [{"name": "mesh", "hostPath": {"path": template.host_dir, "type": "Directory"}}],
        )
    token = {
        "serviceAccountToken": {
            "audience": "istio-ca",
            "expirationSeconds": 43200,
            "path": "istio-token",
        }
    }
    return (
        [
            {"name": "istio-token", "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": "istiod-ca-cert", "mountPath": ROOT_CERT_DIR, "readOnly": True},
            # The root file system is read-only; Python's tempfile needs somewhere.
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        [
            {"name": "istio-token", "projected": {"sources": [token]}},
            {"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}},
            {"name": "tmp", "emptyDir": {}},
        ],
    )


def ready_replicas(deployment_obj: Mapping[str, Any] | None) -> int:
    if deployment_obj is None:
        return 0
    status = deployment_obj.get("status")
    n = status.get("readyReplicas") if isinstance(status, Mapping) else None
    return n if isinstance(n, int) else 0
