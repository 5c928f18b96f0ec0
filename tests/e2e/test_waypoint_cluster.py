"""Waypoints in a running local cluster, driven through `ambientctl` as a user would:
`waypoint apply` makes the pod, process and Service; `waypoint status` answers at once; a
label binds a service (the mesh config shows it); delete and `down` leave nothing behind
(the module's fixture checks the namespaces after `down`, with a waypoint still applied)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import nsutil
from localcluster import mesh
from localcluster.processes import read_records

pytestmark = pytest.mark.netns

HERE = Path(__file__).parent
CLUSTER_FILE = HERE / "waypoint.yaml"
FILE = str(CLUSTER_FILE)
AMBIENTCTL = Path(sys.executable).parent / "ambientctl"
# The waypoint process itself lands separately; until `python -m waypoint` exists, its
# readiness cannot be asked of it.


def ctl(c: mesh.Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(AMBIENTCTL), "--state-root", str(c.state.dir.parent), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def xds(c: mesh.Cluster) -> dict[str, Any]:
    doc = yaml.safe_load(c.paths.xds.read_text())
    assert isinstance(doc, dict)
    return doc


def entry(doc: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
    found = [e for e in doc[kind] if e["name"] == name]
    assert len(found) == 1, (kind, name, doc[kind])
    return dict(found[0])


def environ(pid: int) -> dict[str, str]:
    """A process's environment, or {} once it has exited."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in raw.split("\0") if "=" in line)


def app_pid(c: mesh.Cluster) -> int:
    return next(r.pid for r in read_records(c.state.pidfile_dir) if r.name == "app-shop-web-0")


def test_bad_input_is_a_message_and_an_exit_code(cluster: mesh.Cluster) -> None:
    bad_for = ctl(cluster, "waypoint", "apply", FILE, "-n", "shop", "--for", "pods")
    assert bad_for.returncode == 2 and "invalid choice: 'pods'" in bad_for.stderr
    no_ns = ctl(cluster, "waypoint", "apply", FILE, "-n", "nope")
    assert no_ns.returncode == 1 and "no namespace 'nope'" in no_ns.stderr
    no_node = ctl(cluster, "waypoint", "apply", FILE, "-n", "shop", "--node", "n9")
    assert no_node.returncode == 1 and "no node 'n9'" in no_node.stderr
    bad_name = ctl(cluster, "waypoint", "apply", FILE, "-n", "shop", "--name", "Bad_Name")
    assert bad_name.returncode == 2 and "must be a DNS label" in bad_name.stderr
    none = ctl(cluster, "waypoint", "status", FILE, "-n", "shop")
    assert none.returncode == 1 and "no waypoint in namespace shop" in none.stderr
    gone = ctl(cluster, "waypoint", "delete", FILE, "-n", "shop", "ghost")
    assert gone.returncode == 1 and "no Gateway shop/ghost" in gone.stderr
    both = ctl(cluster, "waypoint", "delete", FILE, "-n", "shop")
    assert both.returncode == 2 and "NAME(s), or --all" in both.stderr
    assert not cluster.paths.gateways.exists()  # nothing was written


def test_waypoint_apply_status_bind_and_delete(cluster: mesh.Cluster) -> None:
    pid = app_pid(cluster)
    done = ctl(cluster, "waypoint", "apply", FILE, "-n", "shop", "--for", "all")
    assert done.returncode == 0, done.stderr
    assert "waypoint shop/waypoint applied (created" in done.stdout

    # The pod: its own netns on n1, recorded; the process: `python -m waypoint` in it.
    netns = f"{cluster.spec.name}-n1-w1"
    assert os.path.exists(nsutil.netns_path(netns))
    assert netns in json.loads(cluster.state.path.read_text())["netns"]
    (rec,) = [r for r in read_records(cluster.state.pidfile_dir) if r.name.startswith("waypoint")]
    assert rec.argv[1:] == ("-m", "waypoint") and rec.netns_path == nsutil.netns_path(netns)
    env = environ(rec.pid)
    if env:  # still running: the contract's variables
        assert env["WAYPOINT_NAME"] == "waypoint" and env["SERVICE_ACCOUNT"] == "waypoint"
        assert env["POD_NAMESPACE"] == "shop" and env["POD_IP"] == "10.244.1.12"

    # The mesh config: its workload (HBONE, never captured) and its Service with a VIP.
    doc = xds(cluster)
    wl = entry(doc, "workloads", "waypoint-0")
    assert (wl["protocol"], wl["workloadIps"]) == ("HBONE", ["10.244.1.12"])
    assert wl["labels"]["istio.io/dataplane-mode"] == "none"
    svc = entry(doc, "services", "waypoint")
    assert svc["hostname"] == "waypoint.shop.svc.cluster.local"
    assert svc["ports"] == {15008: 15008}

    # list: the Gateway's status as Kubernetes users read it.
    listed = ctl(cluster, "waypoint", "list", FILE, "-n", "shop", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    (gateway,) = json.loads(listed.stdout)
    assert gateway["status"]["addresses"][0]["value"] == svc["vips"][0].lstrip("/")
    conditions = {c["type"]: c for c in gateway["status"]["conditions"]}
    assert conditions["Accepted"]["status"] == "True"

    # status: answered at once, ready or why not.
    status = ctl(cluster, "waypoint", "status", FILE, "-n", "shop")
    assert "shop" in status.stdout and "waypoint" in status.stdout
    if conditions["Programmed"]["status"] == "True":
        assert status.returncode == 0
    else:
        assert status.returncode == 1
        assert conditions["Programmed"]["reason"] in status.stdout

    # A label binds the service at runtime; the app keeps running.
    bound = ctl(cluster, "label", FILE, "service", "shop/web", "istio.io/use-waypoint=waypoint")
    assert bound.returncode == 0, bound.stderr
    web = entry(xds(cluster), "services", "web")
    assert web["waypoint"] == {
        "hostname": "shop/waypoint.shop.svc.cluster.local",
        "hboneMtlsPort": 15008,
    }
    bad_label = ctl(cluster, "label", FILE, "service", "shop/web", "istio.io/use-waypoint=A_B")
    assert bad_label.returncode == 2
    assert (
        ctl(cluster, "label", FILE, "service", "shop/web", "istio.io/use-waypoint-").returncode == 0
    )
    assert "waypoint" not in entry(xds(cluster), "services", "web")
    assert app_pid(cluster) == pid

    # A binding to a Gateway that does not exist is written (fail closed) and reported.
    ctl(cluster, "label", FILE, "service", "shop/web", "istio.io/use-waypoint=ghost")
    assert entry(xds(cluster), "services", "web")["waypoint"]["hostname"].startswith("shop/ghost.")
    warned = ctl(cluster, "waypoint", "status", FILE, "-n", "shop")
    assert "no waypoint shop/ghost" in warned.stderr
    ctl(cluster, "label", FILE, "service", "shop/web", "istio.io/use-waypoint-")

    # delete: the pod, its process and its records go.
    deleted = ctl(cluster, "waypoint", "delete", FILE, "-n", "shop", "waypoint")
    assert deleted.returncode == 0, deleted.stderr
    assert not os.path.exists(nsutil.netns_path(netns))
    assert netns not in json.loads(cluster.state.path.read_text())["netns"]
    assert not [r for r in read_records(cluster.state.pidfile_dir) if r.name.startswith("waypoint")]
    assert all(w["name"] != "waypoint-0" for w in xds(cluster)["workloads"])

    # Applied again (on the slot freed), and left for `down` to remove.
    again = ctl(cluster, "waypoint", "apply", FILE, "-n", "shop", "--enroll-namespace")
    assert again.returncode == 0, again.stderr
    assert os.path.exists(nsutil.netns_path(netns))
    assert "waypoint" in entry(xds(cluster), "services", "web")  # the namespace label binds


def test_waypoint_is_programmed_once_it_answers_ready(cluster: mesh.Cluster) -> None:
    ctl(cluster, "waypoint", "apply", FILE, "-n", "shop", "--name", "ready")
    done = ctl(cluster, "waypoint", "apply", FILE, "-n", "shop", "--name", "ready", "--wait",
               "--timeout", "30")  # fmt: skip
    assert done.returncode == 0, done.stderr
    status = ctl(cluster, "waypoint", "status", FILE, "-n", "shop", "--name", "ready")
    assert status.returncode == 0 and "Programmed" in status.stdout
