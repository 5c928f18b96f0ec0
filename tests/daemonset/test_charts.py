"""The Helm charts of daemonset/charts, checked without a cluster: `helm lint --strict`, every
rendered built-in object against Kubernetes' own schemas (kubernetes-validate, strict), every
custom object against its CRD's schema from the base chart's crds/, and the contract's facts
(names, commands, capabilities, volumes, version switches) on the rendered objects."""

from __future__ import annotations

import copy
import filecmp
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from controlplane.admission import ADMISSION_PORT, VALIDATE_PATH, WEBHOOK_CONFIGURATION
from controlplane.install import waypoint_gateway_class
from localcluster.kube import helm
from localcluster.kube.meshrbac import CHARTS_DIR
from tests.daemonset.conftest import (
    CASES,
    CHARTS,
    KUBE_VERSIONS,
    NAMESPACE,
    NEW_KUBE,
    OLD_KUBE,
    RELEASE,
    VALUE_SETS,
    chart_path,
    render,
)

pytestmark = pytest.mark.usefixtures("helm_present")

ROOT = Path(__file__).resolve().parents[2]
APP_VERSION = "0.13.0"
IMAGE = f"ambient-mesh/mesh:{APP_VERSION}"
ISTIOD = f"istiod.{NAMESPACE}.svc:15012"
CAPS = {"tunnel": ["NET_ADMIN", "SYS_ADMIN"], "node-agent": ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"]}


# ---- helpers -------------------------------------------------------------------------------


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{kind} {name}: {len(found)} rendered"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod_spec(workload)["containers"]
    return dict(c)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value, or -> the fieldRef's path."""
    out: dict[str, Any] = {}
    for e in container.get("env", []):
        out[e["name"]] = e["valueFrom"]["fieldRef"]["fieldPath"] if "valueFrom" in e else e["value"]
    return out


def volumes_of(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(workload).get("volumes", [])}


def mounts_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the mount."""
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def crds() -> list[dict[str, Any]]:
    out = []
    for path in sorted((CHARTS_DIR / "base" / "crds").glob("*.yaml")):
        out += [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    return out


def crd_schema(api_version: str, kind: str) -> dict[str, Any] | None:
    """The openAPIV3Schema the base chart's CRDs give (group, version, kind); None when no
    CRD of the base chart serves that group (a built-in kind)."""
    group, _, version = api_version.rpartition("/")
    candidates = [c for c in crds() if c["spec"]["group"] == group]
    if not candidates:
        return None
    of_kind = [c for c in candidates if c["spec"]["names"]["kind"] == kind]
    assert len(of_kind) == 1, f"no CRD for {kind} in group {group}"
    crd = of_kind[0]
    served = {v["name"]: v for v in crd["spec"]["versions"] if v["served"]}
    assert version in served, f"{kind} {api_version}: the CRD serves {sorted(served)}"
    schema: dict[str, Any] = served[version]["schema"]["openAPIV3Schema"]
    return schema


def validate_builtin(obj: dict[str, Any], kube_version: str) -> None:
    """kubernetes-validate --strict, for a version it has schemas of (1.25 and later).

    A 1.20 rendering is checked with 1.25's schemas: its kinds are all still served there
    but policy/v1beta1 PodDisruptionBudget, whose spec is policy/v1's (minAvailable,
    selector), so that one is checked as policy/v1 (the API server dry run checks it as is).
    """
    target = kube_version if kube_version >= "1.25" else "1.25.0"
    obj = copy.deepcopy(obj)
    if obj["apiVersion"] == "policy/v1beta1" and obj["kind"] == "PodDisruptionBudget":
        obj["apiVersion"] = "policy/v1"
    kubernetes_validate.validate(obj, target, strict=True)


def validate_custom(obj: dict[str, Any], schema: dict[str, Any]) -> None:
    # OpenAPI v3.0's schema objects are JSON Schema draft 4 plus vendor keys that a
    # validator ignores (x-kubernetes-*).
    jsonschema.Draft4Validator(schema).validate(obj)


# ---- lint -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize(("chart", "value_set"), CASES)
def test_lint_strict(chart, value_set, kube_version):
    """Helm's checks, warnings included (deprecated APIs for that Kubernetes version)."""
    report = helm.lint(
        chart_path(chart), strict=True, values=VALUE_SETS[value_set], kube_version=kube_version
    )
    assert "1 chart(s) linted, 0 chart(s) failed" in report


def test_lint_strict_fails_on_a_warning(tmp_path):
    """The seeded case: policy/v1beta1 on a Kubernetes that deprecated it is a failure."""
    chart = tmp_path / "controlplane"
    shutil.copytree(CHARTS_DIR / "controlplane", chart)
    pdb = chart / "templates" / "pdb.yaml"
    pdb.write_text(
        pdb.read_text().replace('{{ include "controlplane.pdbApiVersion" . }}', "policy/v1beta1")
    )
    with pytest.raises(helm.HelmError, match="policy/v1beta1 PodDisruptionBudget is deprecated"):
        helm.lint(chart, strict=True, kube_version=NEW_KUBE)


# ---- schemas ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize(("chart", "value_set"), CASES)
def test_every_object_is_valid(chart, value_set, kube_version):
    objs = render(chart, value_set, kube_version)
    assert objs, "nothing rendered"
    for obj in objs:
        schema = crd_schema(obj["apiVersion"], obj["kind"])
        where = f"{obj['kind']} {obj['metadata'].get('name')}"
        try:
            if schema is None:
                validate_builtin(obj, kube_version)
            else:
                validate_custom(obj, schema)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
            pytest.fail(f"{chart}/{value_set}@{kube_version}: {where}: {e}")


def test_the_validators_reject_what_they_should():
    """The checks above can fail: a misspelt field, a wrong type, an unserved version."""
    ds = one(render("tunnel"), "DaemonSet")
    bad = copy.deepcopy(ds)
    pod_spec(bad)["hostnetwork"] = False  # strict: no such field
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(bad, NEW_KUBE)
    bad = copy.deepcopy(ds)
    pod_spec(bad)["terminationGracePeriodSeconds"] = "30"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(bad, NEW_KUBE)
    gc = one(render("base"), "GatewayClass")
    schema = crd_schema(gc["apiVersion"], "GatewayClass")
    assert schema is not None
    with pytest.raises(jsonschema.ValidationError):
        validate_custom({**gc, "spec": "istio.io/waypoint-controller"}, schema)
    with pytest.raises(AssertionError, match="serves"):
        crd_schema("gateway.networking.k8s.io/v1alpha1", "GatewayClass")


# ---- base -------------------------------------------------------------------------------------


def test_base_crds_are_the_control_planes():
    """Byte for byte: controlplane/crds/ is what `python -m controlplane` installs."""
    ours = CHARTS_DIR / "base" / "crds"
    theirs = ROOT / "controlplane" / "crds"
    names = sorted(p.name for p in theirs.glob("*.yaml"))
    assert sorted(p.name for p in ours.iterdir()) == names
    match, mismatch, errors = filecmp.cmpfiles(ours, theirs, names, shallow=False)
    assert (mismatch, errors) == ([], []) and match == names


def test_base_crds_render_with_the_chart():
    with_crds = helm.template(chart_path("base"), RELEASE, NAMESPACE, include_crds=True)
    assert sorted(
        o["metadata"]["name"] for o in with_crds if o["kind"] == "CustomResourceDefinition"
    ) == sorted(c["metadata"]["name"] for c in crds())


def test_base_gateway_class_is_the_one_install_builds():
    gc = one(render("base"), "GatewayClass")
    labels = gc["metadata"].pop("labels")
    assert gc == waypoint_gateway_class()
    assert labels["app.kubernetes.io/part-of"] == "ambient-mesh"
    assert not [o for o in render("base") if o["kind"] != "GatewayClass"], (
        "base renders only the class"
    )
    off = helm.template(chart_path("base"), RELEASE, NAMESPACE, values={"waypointClass": False})
    assert off == []


# ---- labels -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("chart", "value_set"), [c for c in CASES if c[1] != "ebpf"])
def test_every_object_has_the_usual_labels(chart, value_set):
    version = VALUE_SETS[value_set].get("tag", APP_VERSION)
    for obj in render(chart, value_set):
        templates = [obj["metadata"]]
        if "template" in obj.get("spec", {}):
            templates.append(obj["spec"]["template"]["metadata"])
        for meta in templates:
            labels = meta["labels"]
            assert labels["app"] == labels["app.kubernetes.io/name"], obj["kind"]
            assert labels["app.kubernetes.io/instance"] == RELEASE
            assert labels["app.kubernetes.io/version"] == version
            assert labels["app.kubernetes.io/part-of"] == "ambient-mesh"
            assert labels["app.kubernetes.io/managed-by"] == "Helm"
            assert labels["helm.sh/chart"] == f"{chart}-{APP_VERSION}"


CLUSTER_SCOPED = (
    "GatewayClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingWebhookConfiguration",
)


def test_namespaced_objects_go_to_the_release_namespace():
    for chart in CHARTS:
        objs = helm.template(chart_path(chart), RELEASE, "mesh-system")
        for obj in objs:
            if obj["kind"] in CLUSTER_SCOPED:
                assert "namespace" not in obj["metadata"], obj["kind"]
            else:
                assert obj["metadata"]["namespace"] == "mesh-system", obj["kind"]
        for obj in objs:
            for subject in obj.get("subjects", []):
                assert subject["namespace"] == "mesh-system"


# ---- controlplane -----------------------------------------------------------------------------


def test_controlplane_objects():
    objs = render("controlplane")
    assert sorted((o["kind"], o["metadata"]["name"]) for o in objs) == sorted(
        [
            *(
                (k, "istiod")
                for k in (
                    "ServiceAccount",
                    "Deployment",
                    "Service",
                    "PodDisruptionBudget",
                    "ClusterRole",
                    "ClusterRoleBinding",
                    "Role",
                    "RoleBinding",
                )
            ),
            ("ValidatingWebhookConfiguration", WEBHOOK_CONFIGURATION),
        ]
    )
    svc = one(objs, "Service")
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
        ("grpc-xds", 15012, 15012),
        ("http-monitoring", 15014, 15014),
        ("https-webhook", 443, ADMISSION_PORT),
    ]
    dep = one(objs, "Deployment")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"] == {"app": "istiod"}
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": {"app": "istiod"}}}
    assert pod_spec(dep)["serviceAccountName"] == "istiod"
    for binding in ("ClusterRoleBinding", "RoleBinding"):
        b = one(objs, binding)
        assert b["subjects"] == [
            {"kind": "ServiceAccount", "name": "istiod", "namespace": NAMESPACE}
        ]
        assert b["roleRef"]["name"] == "istiod"


def test_controlplane_container():
    c = only_container(one(render("controlplane"), "Deployment"))
    assert c["image"] == IMAGE
    assert c["command"] == ["python3", "-m", "controlplane"]
    assert c["args"] == [
        "--in-cluster",
        "--grpc-listen",
        "0.0.0.0:15012",
        "--readiness-port",
        "8080",
        "--trust-domain",
        "cluster.local",
        "--waypoint-image",
        IMAGE,
        "--no-install-crds",
        "--admission-port",
        str(ADMISSION_PORT),
        "--node-agent-account",
        f"{NAMESPACE}/ambient-node-agent",
        "--log-level",
        "info",
    ]
    assert env_of(c) == {"POD_NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 8080}
    assert c["securityContext"] == {
        "runAsUser": 1337,
        "runAsGroup": 1337,
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


@pytest.mark.parametrize(
    ("kube_version", "policy", "conditions"),
    [(OLD_KUBE, "Ignore", False), ("1.28.0", "Fail", True), (NEW_KUBE, "Fail", True)],
)
def test_controlplane_node_agent_webhook(kube_version, policy, conditions):
    """istiod judges the node agents' pods/status writes at its Service's /validate/node-agent;
    Fail where matchConditions let only the agents' writes through, else Ignore (every
    kubelet's status write would otherwise wait on istiod)."""
    objs = render("controlplane", kube_version=kube_version)
    (hook,) = one(objs, "ValidatingWebhookConfiguration")["webhooks"]
    assert hook["clientConfig"] == {
        "service": {
            "name": "istiod",
            "namespace": NAMESPACE,
            "path": VALIDATE_PATH,
            "port": 443,
        }
    }
    assert hook["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["UPDATE"],
            "resources": ["pods/status"],
            "scope": "Namespaced",
        }
    ]
    assert hook["failurePolicy"] == policy
    assert hook["sideEffects"] == "None"
    expected = [
        {
            "name": "node-agent",
            "expression": "request.userInfo.username == "
            f"'system:serviceaccount:{NAMESPACE}:ambient-node-agent'",
        }
    ]
    assert hook.get("matchConditions") == (expected if conditions else None)


def test_controlplane_node_agent_webhook_values():
    def rendered(values: dict[str, Any]) -> list[Any]:
        return helm.template(
            chart_path("controlplane"), RELEASE, NAMESPACE, values={"nodeAgentAdmission": values}
        )

    objs = rendered({"agentNamespace": "agents", "failurePolicy": "Ignore"})
    (hook,) = one(objs, "ValidatingWebhookConfiguration")["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    args = only_container(one(objs, "Deployment"))["args"]
    assert args[args.index("--node-agent-account") + 1] == "agents/ambient-node-agent"
    off = rendered({"enabled": False})
    assert not [o for o in off if o["kind"] == "ValidatingWebhookConfiguration"]
    assert "--admission-port" not in only_container(one(off, "Deployment"))["args"]
    assert [p["name"] for p in one(off, "Service")["spec"]["ports"]] == [
        "grpc-xds",
        "http-monitoring",
    ]


def test_controlplane_values():
    objs = helm.template(
        chart_path("controlplane"),
        RELEASE,
        NAMESPACE,
        values={
            "trustDomain": "example.org",
            "waypointImage": "other/waypoint:9",
            "pdb": {"minAvailable": 0},
        },
    )
    args = only_container(one(objs, "Deployment"))["args"]
    assert args[args.index("--trust-domain") + 1] == "example.org"
    assert args[args.index("--waypoint-image") + 1] == "other/waypoint:9"
    assert one(objs, "PodDisruptionBudget")["spec"]["minAvailable"] == 0


@pytest.mark.parametrize(
    ("kube_version", "api_version"), [(OLD_KUBE, "policy/v1beta1"), (NEW_KUBE, "policy/v1")]
)
def test_pdb_version_follows_the_api_server(kube_version, api_version):
    assert (
        one(render("controlplane", kube_version=kube_version), "PodDisruptionBudget")["apiVersion"]
        == api_version
    )


# ---- node agent -------------------------------------------------------------------------------


def test_node_agent_objects():
    objs = render("node-agent")
    assert sorted((o["kind"], o["metadata"]["name"]) for o in objs) == sorted(
        (k, "ambient-node-agent")
        for k in (
            "ServiceAccount",
            "DaemonSet",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        )
    )
    ds = one(objs, "DaemonSet")
    spec = pod_spec(ds)
    assert spec["serviceAccountName"] == "ambient-node-agent"
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert ds["spec"]["template"]["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"


def _agent(value_set: str = "defaults") -> dict[str, Any]:
    return one(render("node-agent", value_set), "DaemonSet")


def test_node_agent_container():
    c = only_container(_agent())
    assert c["image"] == IMAGE
    assert c["command"] == ["python3", "-m", "redirect.agent"]
    assert c["args"] == [
        "--pod-source",
        "kubernetes",
        "--zds-socket",
        "/var/run/ztunnel/ztunnel.sock",
        "--redirect-mode",
        "iptables",
        "--dns-capture",
        "--readiness-port",
        "8000",
        "--log-level",
        "info",
    ]
    assert env_of(c) == {
        "NODE_NAME": "spec.nodeName",
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
    }
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
    sc = c["securityContext"]
    assert sc["runAsUser"] == 0 and sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": CAPS["node-agent"]}
    assert sc["allowPrivilegeEscalation"] is False


def test_node_agent_volumes():
    ds = _agent()
    c = only_container(ds)
    vols = volumes_of(ds)
    mounts = mounts_of(c)
    sa_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert set(mounts) == {"/var/run/ztunnel", "/var/run/netns", sa_dir}
    # Its API token is bound to its pod (istiod's webhook finds its node by it), renewed by
    # the kubelet, where 1.20 would mount a legacy secret token.
    assert pod_spec(ds)["automountServiceAccountToken"] is False
    sources = vols[mounts[sa_dir]["name"]]["projected"]["sources"]
    assert sources[0] == {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}
    assert sources[1]["configMap"]["name"] == "kube-root-ca.crt"
    assert mounts[sa_dir]["readOnly"] is True
    sock = vols[mounts["/var/run/ztunnel"]["name"]]
    assert sock["hostPath"] == {"path": "/var/run/ztunnel", "type": "DirectoryOrCreate"}
    netns = mounts["/var/run/netns"]
    assert netns["mountPropagation"] == "HostToContainer"
    assert vols[netns["name"]]["hostPath"]["path"] == "/var/run/netns"


def test_node_agent_ebpf_mode():
    ds = _agent("ebpf")
    c = only_container(ds)
    args = c["args"]
    assert args[args.index("--redirect-mode") + 1] == "ebpf"
    assert c["securityContext"]["privileged"] is True
    assert "allowPrivilegeEscalation" not in c["securityContext"]  # refused with privileged
    mounts = mounts_of(c)
    vols = volumes_of(ds)
    for path in ("/sys/fs/bpf", "/lib/modules", "/usr/src"):
        assert vols[mounts[path]["name"]]["hostPath"]["path"] == path
    assert mounts["/var/run/ztunnel"]  # and what iptables mode has


def test_node_agent_dns_capture_off():
    args = only_container(_agent("no-dns-capture"))["args"]
    assert "--no-dns-capture" in args and "--dns-capture" not in args


@pytest.mark.parametrize("chart", ["node-agent", "tunnel"])
def test_dns_capture_as_a_string(chart):
    """`--set-string dnsCapture=false` (a script's way of passing values) means false too."""
    out = helm.run(["template", RELEASE, chart_path(chart), "--set-string", "dnsCapture=false"])
    (ds,) = [o for o in helm.parse_documents(out) if o["kind"] == "DaemonSet"]
    c = only_container(ds)
    if chart == "node-agent":
        assert "--no-dns-capture" in c["args"]
    else:
        assert env_of(c)["ISTIO_META_DNS_CAPTURE"] == "false"


@pytest.mark.parametrize("mode", ["ebfp", "IPTABLES", "nftables", ""])
def test_a_bad_redirect_mode_fails_to_render(mode):
    with pytest.raises(helm.HelmError) as failed:
        helm.template(chart_path("node-agent"), RELEASE, NAMESPACE, values={"redirectMode": mode})
    assert f'redirectMode must be "iptables" or "ebpf", not "{mode}"' in str(failed.value)


# ---- tunnel -----------------------------------------------------------------------------------


def _tunnel(value_set: str = "defaults", kube_version: str = NEW_KUBE) -> dict[str, Any]:
    return one(render("tunnel", value_set, kube_version), "DaemonSet", "ztunnel")


def test_tunnel_objects():
    objs = render("tunnel")
    assert sorted((o["kind"], o["metadata"]["name"]) for o in objs) == [
        ("DaemonSet", "ztunnel"),
        ("ServiceAccount", "ztunnel"),
    ], "no RBAC: the tunnel talks only to istiod"
    spec = pod_spec(_tunnel())
    assert spec["serviceAccountName"] == "ztunnel"
    assert not spec.get("hostNetwork", False)
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["terminationGracePeriodSeconds"] == 30
    assert spec["automountServiceAccountToken"] is False


def test_tunnel_container():
    c = only_container(_tunnel())
    assert c["image"] == IMAGE
    assert c["command"] == ["python3", "-m", "ztunnel"]
    assert "args" not in c
    assert env_of(c) == {
        "NODE_NAME": "spec.nodeName",
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "INSTANCE_IP": "status.podIP",
        "ZDS_SOCKET": "/var/run/ztunnel/ztunnel.sock",
        "XDS_ADDRESS": ISTIOD,
        "CA_ADDRESS": ISTIOD,
        "XDS_ROOT_CERT": "/var/run/secrets/istio/root-cert.pem",
        "CA_ROOT_CERT": "/var/run/secrets/istio/root-cert.pem",
        "CA_TOKEN_PATH": "/var/run/secrets/tokens/istio-token",
        "TRUST_DOMAIN": "cluster.local",
        "LOG_LEVEL": "info",
        "ISTIO_META_DNS_CAPTURE": "true",
    }
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    sc = c["securityContext"]
    assert sc["runAsUser"] == 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": CAPS["tunnel"]}


def test_tunnel_volumes():
    ds = _tunnel()
    vols = volumes_of(ds)
    mounts = mounts_of(only_container(ds))
    token = vols[mounts["/var/run/secrets/tokens"]["name"]]
    assert token["projected"]["sources"] == [
        {
            "serviceAccountToken": {
                "audience": "istio-ca",
                "expirationSeconds": 43200,
                "path": "istio-token",
            }
        }
    ]
    root = vols[mounts["/var/run/secrets/istio"]["name"]]
    assert root["configMap"] == {"name": "istio-ca-root-cert"}
    sock = vols[mounts["/var/run/ztunnel"]["name"]]
    assert sock["hostPath"] == {"path": "/var/run/ztunnel", "type": "DirectoryOrCreate"}
    # The scratch space a read-only root needs.
    assert "emptyDir" in vols[mounts["/tmp"]["name"]]


def test_tunnel_and_node_agent_share_the_zds_directory():
    def sock_dir(ds: dict[str, Any]) -> tuple[str, str]:
        c = only_container(ds)
        mount = mounts_of(c)["/var/run/ztunnel"]
        return volumes_of(ds)[mount["name"]]["hostPath"]["path"], mount["mountPath"]

    tunnel, agent = _tunnel(), _agent()
    assert sock_dir(tunnel) == sock_dir(agent) == ("/var/run/ztunnel", "/var/run/ztunnel")
    zds = env_of(only_container(tunnel))["ZDS_SOCKET"]
    args = only_container(agent)["args"]
    assert args[args.index("--zds-socket") + 1] == zds


def _secrets_in(ds: dict[str, Any]) -> list[str]:
    """Volumes of a workload that carry a Secret, whole or as a projected source."""
    found = []
    for name, v in volumes_of(ds).items():
        sources = v.get("projected", {}).get("sources", [])
        if "secret" in v or any("secret" in s for s in sources):
            found.append(name)
    return found


@pytest.mark.parametrize(
    ("chart", "value_set"), [c for c in CASES if c[0] in ("node-agent", "tunnel")]
)
def test_no_node_component_mounts_a_secret(chart: str, value_set: str) -> None:
    # Root on a node is trusted for that node only: the CA's key (a Secret of the control
    # plane) must not reach a node. The tunnel gets a projected token and the root
    # certificate's ConfigMap; the node agent nothing of the kind.
    daemonsets = [o for o in render(chart, value_set) if o["kind"] == "DaemonSet"]
    assert daemonsets
    for ds in daemonsets:
        assert _secrets_in(ds) == [], ds["metadata"]["name"]
        for c in pod_spec(ds)["containers"]:
            assert not [e for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
            assert not [e for e in c.get("envFrom", []) if "secretRef" in e]


def test_the_secret_check_can_fail() -> None:
    ds = copy.deepcopy(_tunnel())
    pod_spec(ds)["volumes"].append({"name": "ca", "secret": {"secretName": "istio-ca-secret"}})
    pod_spec(ds)["volumes"].append(
        {"name": "p", "projected": {"sources": [{"secret": {"name": "istio-ca-secret"}}]}}
    )
    assert _secrets_in(ds) == ["ca", "p"]


def test_tunnel_values():
    objs = helm.template(
        chart_path("tunnel"),
        RELEASE,
        "mesh-nodes",
        values={"controlPlaneNamespace": "mesh-cp", "trustDomain": "example.org"},
    )
    env = env_of(only_container(one(objs, "DaemonSet")))
    assert env["XDS_ADDRESS"] == env["CA_ADDRESS"] == "istiod.mesh-cp.svc:15012"
    assert env["TRUST_DOMAIN"] == "example.org"
    env = env_of(only_container(_tunnel("no-dns-capture")))
    assert env["ISTIO_META_DNS_CAPTURE"] == "false"


@pytest.mark.parametrize(
    ("kube_version", "rolling"),
    [(OLD_KUBE, {"maxUnavailable": 1}), (NEW_KUBE, {"maxSurge": 1, "maxUnavailable": 0})],
)
def test_tunnel_surge_follows_the_api_server(kube_version, rolling):
    strategy = _tunnel(kube_version=kube_version)["spec"]["updateStrategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": rolling}


# ---- common values ----------------------------------------------------------------------------


def _workloads(chart: str, value_set: str) -> list[dict[str, Any]]:
    return [o for o in render(chart, value_set) if o["kind"] in ("Deployment", "DaemonSet")]


@pytest.mark.parametrize("chart", ["controlplane", "node-agent", "tunnel"])
def test_custom_image(chart):
    (w,) = _workloads(chart, "custom-image")
    c = only_container(w)
    assert c["image"] == "registry.example/team/mesh-x:1.2.3-rc.1"
    assert c["imagePullPolicy"] == "IfNotPresent"
    if chart == "controlplane":
        assert c["args"][c["args"].index("--waypoint-image") + 1] == c["image"]


@pytest.mark.parametrize("chart", ["controlplane", "node-agent", "tunnel"])
def test_resources_and_placement(chart):
    values = VALUE_SETS["resources"]
    (w,) = _workloads(chart, "resources")
    c = only_container(w)
    assert c["resources"] == values["resources"]
    assert pod_spec(w)["nodeSelector"] == values["nodeSelector"]
    assert w["spec"]["template"]["metadata"]["annotations"] == values["podAnnotations"]
    level = env_of(c).get("LOG_LEVEL") or c["args"][c["args"].index("--log-level") + 1]
    assert level == "debug"
    (default,) = _workloads(chart, "defaults")
    assert "annotations" not in default["spec"]["template"]["metadata"]
    assert "nodeSelector" not in pod_spec(default)


def undocumented(lines: list[str]) -> list[str]:
    """The keys of a values.yaml without a comment right above: every top-level key, and
    the keys of a grouping key (one whose own comment is below it, like `pdb:`). What is
    inside a documented value (`resources: requests: ...`) is that value's example."""
    out: list[str] = []
    group: int | str | None = None  # the indentation of a grouping key's children
    for i, line in enumerate(lines):
        text = line.strip()
        if not text or text.startswith(("#", "-")) or ":" not in text:
            continue
        indent = len(line) - len(line.lstrip())
        above = lines[i - 1].strip() if i else ""
        below = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if indent == 0:
            group = None
            if text.endswith(":") and below.startswith("#"):
                group = "next"
                continue
        elif group in ("next", indent):
            group = indent
        else:
            continue
        if not above.startswith("#"):
            out.append(text)
    return out


def test_the_documentation_check_can_fail():
    assert undocumented(["# -- a", "a: 1", "b: 2"]) == ["b: 2"]
    assert undocumented(["pdb:", "  # -- x", "  x: 1", "  y: 2"]) == ["y: 2"]
    assert undocumented(["# -- r", "r:", "  requests:", "    cpu: 1"]) == []


@pytest.mark.parametrize("chart", CHARTS)
def test_every_value_is_documented(chart):
    """values.yaml says what each value is; the chart's README lists every value."""
    lines = (CHARTS_DIR / chart / "values.yaml").read_text().splitlines()
    assert undocumented(lines) == []
    readme = (CHARTS_DIR / chart / "README.md").read_text()
    keys = yaml.safe_load("\n".join(lines))
    for key, value in keys.items():
        names = [f"{key}.{k}" for k in value] if key in ("pdb", "nodeAgentAdmission") else [key]
        for name in names:
            assert f"| `{name}` |" in readme, f"{chart}/README.md does not list {name}"


@pytest.mark.parametrize("chart", CHARTS)
def test_chart_metadata(chart):
    meta = yaml.safe_load((CHARTS_DIR / chart / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == chart
    assert meta["appVersion"] == APP_VERSION
    assert meta["kubeVersion"] == ">=1.20.0-0"
