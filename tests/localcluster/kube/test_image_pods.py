"""The local kubelet runs containers from images: a busybox image in a store of the test's own,
real pods against the real API server, and what each sees inside."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns as pr_netns

from localcluster.kube.containerplan import CAPABILITIES, DEFAULT_CAPABILITIES, cap_mask
from localcluster.kube.images import STORE_ENV
from localcluster.kube.kubelet import process_name

from .busybox import DIGEST, REF, build_store
from .conftest import KubeNodes, pod_ready, wait_for

pytestmark = [pytest.mark.kube, pytest.mark.netns]


@pytest.fixture(scope="session")
def busybox_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_store(tmp_path_factory.mktemp("images"))


@pytest.fixture
def image_nodes(
    busybox_store: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> KubeNodes:
    """`kube_nodes` whose kubelet reads the test's image store."""
    monkeypatch.setenv(STORE_ENV, str(busybox_store))
    nodes: KubeNodes = request.getfixturevalue("kube_nodes")
    return nodes


def bpod(
    name: str,
    script: str | None = None,
    *,
    command: list[str] | None = None,
    args: list[str] | None = None,
    node: str | None = None,
    sc: dict[str, Any] | None = None,
    env: list[dict[str, Any]] | None = None,
    volumes: list[dict[str, Any]] | None = None,
    mounts: list[dict[str, Any]] | None = None,
    restart: str = "Never",
    envFrom: list[dict[str, Any]] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A pod of the busybox image; `script` is its args (run by the image's `sh -c`)."""
    c: dict[str, Any] = {"name": "c", "image": REF}
    if script is not None:
        c["args"] = [script]
    if command is not None:
        c["command"] = command
    if args is not None:
        c["args"] = args
    for key, value in (
        ("securityContext", sc),
        ("env", env),
        ("envFrom", envFrom),
        ("volumeMounts", mounts),
    ):
        if value:
            c[key] = value
    s: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 5,
        "restartPolicy": restart,
        "containers": [c],
        **spec,
    }
    if volumes:
        s["volumes"] = volumes
    if node is not None:
        s["nodeName"] = node
    return {"metadata": {"name": name}, "spec": s}


def create(k: KubeNodes, ns: str, *pods: dict[str, Any]) -> None:
    for p in pods:
        k.api("POST", f"/api/v1/namespaces/{ns}/pods", p)


def log_path(k: KubeNodes, ns: str, name: str) -> Path:
    uid = k.api("GET", f"/api/v1/namespaces/{ns}/pods/{name}")["metadata"]["uid"]
    return k.state.log_dir / f"{process_name(uid)}-{ns}-{name[:100]}.log"


def pod_log(k: KubeNodes, ns: str, name: str) -> str:
    try:
        return log_path(k, ns, name).read_text(errors="replace")
    except OSError:
        return ""


def phases(k: KubeNodes, ns: str) -> dict[str, str]:
    return {p["metadata"]["name"]: (p.get("status") or {}).get("phase", "") for p in k.pods(ns)}


def wait_phase(k: KubeNodes, ns: str, names: list[str], phase: str, timeout: float = 60) -> None:
    wait_for(
        lambda: all(phases(k, ns).get(n) == phase for n in names),
        timeout,
        f"pods {names} {phase}",
        k.kubelet_log,
    )


def wait_log(k: KubeNodes, ns: str, name: str, text: str, timeout: float = 60) -> str:
    return str(
        wait_for(
            lambda: (log := pod_log(k, ns, name)) and text in log and log,
            timeout,
            f"{text!r} in the log of {name}",
            k.kubelet_log,
        )
    )


def status_caps(text: str) -> dict[str, int]:
    return {
        line.split(":")[0]: int(line.split()[1], 16)
        for line in text.splitlines()
        if line.startswith("Cap")
    }


def mount_points() -> set[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return {line.split()[4] for line in f}


def test_argv_rules_env_user_and_image_status(image_nodes: KubeNodes) -> None:
    k = image_nodes
    ns = k.namespace()
    env = [
        {"name": "OVERRIDDEN", "value": "pod"},
        {"name": "FROM_POD", "value": "p-$(OVERRIDDEN)"},
    ]
    k.api(
        "POST",
        f"/api/v1/namespaces/{ns}/configmaps",
        {"metadata": {"name": "envcm"}, "data": {"FROM_CM": "cm", "1-not-a-name": "x"}},
    )
    k.api(
        "POST",
        f"/api/v1/namespaces/{ns}/secrets",
        {"metadata": {"name": "envsec"}, "data": {"k": base64.b64encode(b"sv").decode()}},
    )
    both_env: list[dict[str, Any]] = [
        *env,
        {"name": "SECRET_VAR", "valueFrom": {"secretKeyRef": {"name": "envsec", "key": "k"}}},
    ]
    create(
        k,
        ns,
        bpod("image"),  # ENTRYPOINT + CMD: `sh -c "echo image-cmd; id -u"`
        bpod("args", args=["echo args-only $0 $FROM_IMAGE $OVERRIDDEN $FROM_POD", "zero"], env=env),
        bpod("command", command=["/bin/echo", "cmd-only"]),
        bpod(
            "both",
            command=["/bin/sh", "-c"],
            args=[
                "echo both $(FROM_POD) $P_FROM_CM $SECRET_VAR; id -u; id -g; id -G; pwd; echo $HOME"
            ],
            env=both_env,
            sc={"runAsUser": 1000, "runAsGroup": 3000},
            envFrom=[{"prefix": "P_", "configMapRef": {"name": "envcm"}}],
        ),
        bpod("imageuser", "id -un; id -G", sc={"runAsUser": 1000}),
    )
    names = ["image", "args", "command", "both", "imageuser"]
    wait_phase(k, ns, names, "Succeeded")
    assert pod_log(k, ns, "image") == "image-cmd\n0\n"
    assert pod_log(k, ns, "args") == "args-only zero image pod p-pod\n"
    assert pod_log(k, ns, "command") == "cmd-only\n"
    # runAsGroup wins over the passwd entry's group; the groups /etc/group lists the user in
    # are added; HOME comes from /etc/passwd.
    assert pod_log(k, ns, "both") == "both p-pod cm sv\n1000\n3000\n3000 2000\n/\n/home/app\n"
    # No runAsGroup: the user's own group from the image's /etc/passwd.
    assert pod_log(k, ns, "imageuser") == "app\n1000 2000\n"
    st = k.api("GET", f"/api/v1/namespaces/{ns}/pods/image")["status"]["containerStatuses"][0]
    assert st["image"] == REF
    assert st["imageID"] == f"test/busybox@{DIGEST}"
    assert st["state"]["terminated"]["exitCode"] == 0


def test_capabilities_inside(image_nodes: KubeNodes) -> None:
    k = image_nodes
    ns = k.namespace()
    show = "grep Cap /proc/self/status"
    create(
        k,
        ns,
        bpod("narrow", show, sc={"capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}}),
        bpod("default", show),
        bpod("privileged", show, sc={"privileged": True}),
        bpod("nonroot", show, sc={"runAsUser": 1000, "capabilities": {"add": ["CAP_NET_RAW"]}}),
        bpod("nnp", "grep NoNewPrivs /proc/self/status", sc={"allowPrivilegeEscalation": False}),
    )
    wait_phase(k, ns, ["narrow", "default", "privileged", "nonroot", "nnp"], "Succeeded")
    narrow = status_caps(pod_log(k, ns, "narrow"))
    assert narrow["CapEff"] == narrow["CapBnd"] == narrow["CapPrm"] == 1 << 12
    assert narrow["CapInh"] == narrow["CapAmb"] == 0
    default = status_caps(pod_log(k, ns, "default"))
    docker = cap_mask(frozenset(CAPABILITIES[n] for n in DEFAULT_CAPABILITIES))
    assert docker == 0xA80425FB
    assert default["CapEff"] == default["CapBnd"] == docker
    # Privileged: everything this machine has (its own bounding set).
    with open("/proc/self/status", encoding="utf-8") as f:
        ours = status_caps(f.read())["CapBnd"]
    privileged = status_caps(pod_log(k, ns, "privileged"))
    assert privileged["CapEff"] == privileged["CapBnd"] == ours
    # A non-root user keeps the set only as its bound, as under Docker.
    nonroot = status_caps(pod_log(k, ns, "nonroot"))
    assert nonroot["CapEff"] == nonroot["CapPrm"] == 0 and nonroot["CapBnd"] == docker
    assert pod_log(k, ns, "nnp").split() == ["NoNewPrivs:", "1"]


def test_root_filesystem_overlay_and_read_only(image_nodes: KubeNodes, busybox_store: Path) -> None:
    k = image_nodes
    ns = k.namespace()
    create(
        k,
        ns,
        bpod("rw", "echo changed > /etc/image-file && cat /etc/image-file"),
        bpod(
            "ro",
            "touch /new 2>/dev/null && echo wrote || echo refused;"
            " echo ok > /tmp/t/x && cat /tmp/t/x",
            sc={"readOnlyRootFilesystem": True},
            volumes=[{"name": "scratch", "emptyDir": {}}],
            mounts=[{"name": "scratch", "mountPath": "/tmp/t"}],
        ),
    )
    wait_phase(k, ns, ["rw", "ro"], "Succeeded")
    assert pod_log(k, ns, "rw") == "changed\n"
    image_file = busybox_store / "test" / "busybox" / "1" / "rootfs" / "etc" / "image-file"
    assert image_file.read_text() == "from the image\n"  # the write went to the pod's layer
    uid = k.api("GET", f"/api/v1/namespaces/{ns}/pods/rw")["metadata"]["uid"]
    upper = k.state.dir / "pods" / uid / "upper" / "etc" / "image-file"
    assert upper.read_text() == "changed\n"
    assert (k.state.dir / "pods" / uid).stat().st_mode & 0o777 == 0o700  # root's alone
    # Read-only root, writable volume.
    assert pod_log(k, ns, "ro") == "refused\nok\n"
    k.api("DELETE", f"/api/v1/namespaces/{ns}/pods/rw")
    wait_for(lambda: "rw" not in phases(k, ns), 30, "the rw pod gone", k.kubelet_log)
    pod_dir = k.state.dir / "pods" / uid
    # A finished pod is deleted at once: the kubelet removes its files when it sees it gone.
    wait_for(lambda: not pod_dir.exists(), 30, "the pod's files removed", k.kubelet_log)


def test_host_path_per_node_and_netns_propagation(image_nodes: KubeNodes) -> None:
    k = image_nodes
    ns = k.namespace()
    a, b = k.node(0), k.node(1)
    before = mount_points()
    hp = [{"name": "x", "hostPath": {"path": "/var/run/x", "type": "DirectoryOrCreate"}}]
    xm = [{"name": "x", "mountPath": "/var/run/x"}]
    name_env = [{"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    create(
        k,
        ns,
        bpod("wa", "echo $ME > /var/run/x/f", node=a, env=name_env, volumes=hp, mounts=xm),
        bpod("wb", "echo $ME > /var/run/x/f", node=b, env=name_env, volumes=hp, mounts=xm),
    )
    wait_phase(k, ns, ["wa", "wb"], "Succeeded")
    for node, writer in ((a, "wa"), (b, "wb")):
        f = k.state.dir / "nodes" / node / "host" / "var" / "run" / "x" / "f"
        assert f.read_text() == f"{writer}\n"
    create(k, ns, bpod("ra", "cat /var/run/x/f", node=a, volumes=hp, mounts=xm))
    wait_phase(k, ns, ["ra"], "Succeeded")
    assert pod_log(k, ns, "ra") == "wa\n"

    # A netns made after the pod started appears inside (HostToContainer).
    later = f"{k.spec.name}-later-{secrets.token_hex(2)}"
    create(
        k,
        ns,
        bpod(
            "netns",
            f"while [ ! -e /var/run/netns/{later} ]; do sleep 0.2; done; echo seen",
            node=a,
            volumes=[{"name": "n", "hostPath": {"path": "/var/run/netns"}}],
            mounts=[
                {"name": "n", "mountPath": "/var/run/netns", "mountPropagation": "HostToContainer"}
            ],
        ),
    )
    wait_phase(k, ns, ["netns"], "Running")
    # While it runs, none of its mounts (root, volumes) is the machine's.
    assert not [m for m in mount_points() if m.startswith(str(k.state.dir))]
    try:
        pr_netns.create(later)
        wait_phase(k, ns, ["netns"], "Succeeded")
    finally:
        if os.path.exists(f"/run/netns/{later}"):
            pr_netns.remove(later)
    assert pod_log(k, ns, "netns") == "seen\n"
    for name in ("wa", "wb", "ra", "netns"):
        k.api("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}")
    wait_for(lambda: not k.pods(ns), 60, "the pods gone", k.kubelet_log)
    # Every mount was in a container's own namespace: none is left in the machine's (the
    # pods' netns files go once the kubelet has seen the pods gone).
    wait_for(
        lambda: not (mount_points() - before),
        30,
        "no mount left",
        lambda: f"left: {mount_points() - before}\n{k.kubelet_log()}",
    )


def test_volumes_emptydir_secret_configmap_token(image_nodes: KubeNodes) -> None:
    k = image_nodes
    ns = k.namespace()
    # Admission needs the namespace's service account and its token Secret (automount).
    wait_for(
        lambda: (
            (got := k.try_api("GET", f"/api/v1/namespaces/{ns}/serviceaccounts/default"))[0] == 200
            and got[1].get("secrets")
        ),
        60,
        "the default service account and its token",
        k.kubelet_log,
    )
    k.api(
        "POST",
        f"/api/v1/namespaces/{ns}/configmaps",
        {"metadata": {"name": "cfg"}, "data": {"k": "v1"}},
    )
    k.api(
        "POST",
        f"/api/v1/namespaces/{ns}/secrets",
        {"metadata": {"name": "sec"}, "data": {"s": base64.b64encode(b"sv1").decode()}},
    )
    create(
        k,
        ns,
        bpod(
            "restarts",
            "if [ -e /cache/mark ] && [ -e /mem/mark ]; then echo kept; exit 0; fi;"
            " touch /cache/mark /mem/mark; exit 1",
            restart="OnFailure",
            volumes=[
                {"name": "cache", "emptyDir": {}},
                {"name": "mem", "emptyDir": {"medium": "Memory"}},
            ],
            mounts=[{"name": "cache", "mountPath": "/cache"}, {"name": "mem", "mountPath": "/mem"}],
        ),
        bpod(
            "files",
            'while true; do echo "cfg=$(cat /cfg/k) sec=$(cat /sec/s)"; sleep 0.3; done',
            restart="Always",
            volumes=[
                {"name": "cfg", "configMap": {"name": "cfg"}},
                {"name": "sec", "secret": {"secretName": "sec", "defaultMode": 0o400}},
            ],
            mounts=[
                {"name": "cfg", "mountPath": "/cfg"},
                {"name": "sec", "mountPath": "/sec", "readOnly": True},
            ],
        ),
        bpod(
            "token",
            "cat /var/run/secrets/tokens/istio-token; echo; cat /var/run/secrets/tokens/labels;"
            " echo; cat /var/run/secrets/kubernetes.io/serviceaccount/namespace",
            automountServiceAccountToken=True,
            volumes=[
                {
                    "name": "istio-token",
                    "projected": {
                        "sources": [
                            {
                                "serviceAccountToken": {
                                    "audience": "istio-ca",
                                    "expirationSeconds": 43200,
                                    "path": "istio-token",
                                }
                            },
                            {
                                "downwardAPI": {
                                    "items": [
                                        {
                                            "path": "labels",
                                            "fieldRef": {"fieldPath": "metadata.labels"},
                                        }
                                    ]
                                }
                            },
                        ]
                    },
                }
            ],
            mounts=[{"name": "istio-token", "mountPath": "/var/run/secrets/tokens"}],
        ),
    )
    wait_log(k, ns, "files", "cfg=v1 sec=sv1")
    k.api(
        "PATCH",
        f"/api/v1/namespaces/{ns}/configmaps/cfg",
        {"data": {"k": "v2"}},
    )
    k.api(
        "PATCH",
        f"/api/v1/namespaces/{ns}/secrets/sec",
        {"data": {"s": base64.b64encode(b"sv2").decode()}},
    )
    wait_log(k, ns, "files", "cfg=v2 sec=sv2")

    wait_phase(k, ns, ["restarts", "token"], "Succeeded")
    # Both emptyDirs outlived the failed first run (disk and Memory).
    assert pod_log(k, ns, "restarts") == "kept\n"
    restarts = k.api("GET", f"/api/v1/namespaces/{ns}/pods/restarts")["status"]
    assert restarts["containerStatuses"][0]["restartCount"] == 1

    token, labels, namespace = pod_log(k, ns, "token").splitlines()[:3]
    pod = k.api("GET", f"/api/v1/namespaces/{ns}/pods/token")
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["aud"] == ["istio-ca"]
    assert claims["kubernetes.io"]["pod"] == {
        "name": "token",
        "uid": pod["metadata"]["uid"],
    }
    assert claims["exp"] - claims["iat"] == 43200
    review = k.api(
        "POST",
        "/apis/authentication.k8s.io/v1/tokenreviews",
        {"spec": {"token": token, "audiences": ["istio-ca"]}},
    )
    assert review["status"]["authenticated"] is True
    assert review["status"]["user"]["username"] == f"system:serviceaccount:{ns}:default"
    assert labels == ""  # the pod has no labels: the downward API file is empty
    # The service-account Secret volume v1.20's admission injects for automount.
    assert namespace == ns


def test_readiness_probe_graceful_stop_and_problems(
    image_nodes: KubeNodes, busybox_store: Path
) -> None:
    k = image_nodes
    ns = k.namespace()
    late = f"test/late:{secrets.token_hex(3)}"  # stored only after its pod was created
    httpd = bpod(
        "httpd",
        "mkdir -p /tmp/www && echo hello > /tmp/www/index.html"
        " && exec httpd -f -p 8080 -h /tmp/www",
        restart="Always",
    )
    httpd["spec"]["containers"][0]["readinessProbe"] = {
        "httpGet": {"path": "/index.html", "port": 8080},
        "periodSeconds": 1,
    }
    create(
        k,
        ns,
        httpd,
        bpod(
            "graceful",
            "trap 'echo got-term; exit 0' TERM; echo up; while true; do sleep 0.2; done",
            restart="Always",
        ),
        bpod("noexec", command=["/bin/not-there"]),
        bpod("nfs", "true", volumes=[{"name": "n", "nfs": {"server": "x", "path": "/"}}]),
        bpod(
            "nodir",
            "true",
            volumes=[{"name": "d", "hostPath": {"path": "/not/there", "type": "Directory"}}],
            mounts=[{"name": "d", "mountPath": "/d"}],
        ),
        {
            "metadata": {"name": "late"},
            "spec": {
                "automountServiceAccountToken": False,
                "restartPolicy": "Never",
                "containers": [{"name": "c", "image": late}],
            },
        },
    )
    wait_for(
        lambda: [p for p in k.pods(ns) if p["metadata"]["name"] == "httpd" and pod_ready(p)],
        60,
        "httpd Ready",
        k.kubelet_log,
    )

    def waiting() -> dict[str, dict[str, Any]]:
        out = {}
        for p in k.pods(ns):
            st = ((p.get("status") or {}).get("containerStatuses") or [{}])[0]
            w = (st.get("state") or {}).get("waiting") or {}
            if w.get("message"):
                out[p["metadata"]["name"]] = w
        return out if {"noexec", "nfs", "nodir", "late"} <= set(out) else {}

    w = wait_for(waiting, 60, "the three problems reported", k.kubelet_log)
    assert w["noexec"]["reason"] == "CreateContainerError"
    assert "/bin/not-there" in w["noexec"]["message"]
    assert w["nfs"]["reason"] == "CreateContainerError" and "nfs" in w["nfs"]["message"]
    assert w["nodir"]["reason"] == "ContainerCreating"
    assert "/not/there" in w["nodir"]["message"] and "does not exist" in w["nodir"]["message"]
    assert w["late"]["reason"] == "CreateContainerError"
    assert "not in the local image store" in w["late"]["message"]
    # The image is stored now (image.json last, as image builds do): the pod runs from it.
    repo, tag = late.split(":")
    src = busybox_store / "test" / "busybox" / "1"
    shutil.copytree(src / "rootfs", busybox_store / repo / tag / "rootfs", symlinks=True)
    meta = json.loads((src / "image.json").read_text())
    (busybox_store / repo / tag / "image.json").write_text(json.dumps({**meta, "ref": late}))
    wait_phase(k, ns, ["late"], "Succeeded")
    assert pod_log(k, ns, "late") == "image-cmd\n0\n"

    wait_log(k, ns, "graceful", "up")
    log = log_path(k, ns, "graceful")
    uid = k.api("GET", f"/api/v1/namespaces/{ns}/pods/graceful")["metadata"]["uid"]
    assert (k.state.dir / "pods" / uid).is_dir()
    k.api("DELETE", f"/api/v1/namespaces/{ns}/pods/graceful")
    wait_for(lambda: "graceful" not in phases(k, ns), 30, "graceful gone", k.kubelet_log)
    # TERM first: the container's trap ran; then its files went with it.
    assert log.read_text().startswith("up\n") and "got-term\n" in log.read_text()
    assert not (k.state.dir / "pods" / uid).exists()
