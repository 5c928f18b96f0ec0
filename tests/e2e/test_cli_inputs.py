"""`ambientctl` tried as a new user would, on a running cluster of its own (cli.yaml): every
bad input gets a clear message and an exit code (2 usage, 1 runtime), never a traceback,
and changes nothing; the good ones do what kubectl users expect.

Each command runs as its own process, as a user runs it. "Nothing changed" is the
cluster's records and generated mesh config (byte for byte), its namespaces and its
processes, compared before and after.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pyroute2 import netns as pr_netns

from localcluster import mesh
from localcluster.processes import is_running, read_records
from meshcore.defaults import ADMIN_PORT
from tests.support.aio import wait_until_sync

pytestmark = pytest.mark.netns

HERE = Path(__file__).parent
CLUSTER_FILE = HERE / "cli.yaml"  # the module's cluster (conftest.py brings it up)
NAME = "clix"
AMBIENTCTL = Path(sys.executable).parent / "ambientctl"
PAUSE = ["{python}", "-c", "import signal; signal.pause()"]


@dataclass
class Ctl:
    state_root: Path

    def __call__(
        self, *args: str, stdin: str | bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        data = stdin.encode() if isinstance(stdin, str) else stdin
        done = subprocess.run(
            [str(AMBIENTCTL), "--state-root", str(self.state_root), *args],
            capture_output=True,
            input=data,
            timeout=120,
        )
        out = subprocess.CompletedProcess(
            done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
        )
        assert "Traceback" not in out.stderr, out.stderr
        return out


@pytest.fixture
def ctl(cluster: mesh.Cluster) -> Ctl:
    return Ctl(cluster.state.dir.parent)


def snapshot(c: mesh.Cluster) -> dict[str, Any]:
    """What a change could touch: records, the mesh config, namespaces, processes."""

    def content(p: Path) -> bytes | None:
        return p.read_bytes() if p.exists() else None

    return {
        "xds": content(c.paths.xds),
        "pods": content(c.paths.pods),
        "policies": content(c.paths.policies),
        "netns": sorted(n for n in pr_netns.listnetns() if n.startswith(f"{NAME}-")),
        "running": sorted(
            r.name for r in read_records(c.state.pidfile_dir) if is_running(r.pid, r.start_time)
        ),
    }


@pytest.fixture
def unchanged(cluster: mesh.Cluster) -> Iterator[None]:
    """The test's commands must leave the cluster exactly as they found it."""
    before = snapshot(cluster)
    yield
    assert snapshot(cluster) == before


def write(tmp_path: Path, name: str, text: str | bytes) -> str:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return str(p)


def authz(name: str, ns: str | None = "mesh", **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if ns is not None:
        meta["namespace"] = ns
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": meta,
        "spec": spec
        or {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["x"]}}]}]},
    }


def docs(*items: dict[str, Any]) -> str:
    return yaml.safe_dump_all(list(items))


def digest(c: mesh.Cluster) -> str:
    return hashlib.sha256(c.paths.xds.read_bytes()).hexdigest()


def config_of(c: mesh.Cluster) -> dict[str, Any]:
    return (mesh.tunnel_status(c.layout, "n1") or {}).get("config") or {}


CF = str(CLUSTER_FILE)

# ---- apply / delete -------------------------------------------------------------------------

# A kind neither the tunnels nor the waypoints read (the waypoints read VirtualService).
SIDECAR = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "Sidecar",
    "metadata": {"name": "reviews", "namespace": "mesh"},
    "spec": {"egress": [{"hosts": ["./*"]}]},
}
# A VirtualService the waypoints' parser refuses: a typo'd field, named.
BAD_VIRTUAL_SERVICE = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "reviews", "namespace": "mesh"},
    "spec": {"hosts": ["reviews"], "htp": []},
}
STAR: dict[str, Any] = {
    "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/*/sa/a"]}}]}]
}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (docs(SIDECAR), "kind 'Sidecar' is not one this mesh reads: the tunnels enforce "
         "AuthorizationPolicy, PeerAuthentication; the waypoints HTTPRoute"),
        (docs(BAD_VIRTUAL_SERVICE), "spec.htp: unknown field"),
        (docs(authz("p", action="ALLOWW")), "spec.action: expected one of ALLOW, DENY, AUDIT, "
         "CUSTOM, got 'ALLOWW'"),
        (docs(authz("p", action="ALLOW", rulez=[{}])), "spec.rulez: unknown field"),
        (docs(authz("p", **STAR)), "spec.rules[0].from[0].source.principals[0]: "
         "'cluster.local/ns/*/sa/a': '*' may only be the whole value"),
        (docs(authz("good"), SIDECAR), "stdin[1]: kind 'Sidecar'"),
        ("{not: [yaml", "is not valid YAML"),
        ("", "holds no documents"),
    ],
    ids=["unknown kind", "bad virtual service", "bad action", "typo'd field",
         "star inside a principal", "one bad document of two", "not yaml", "empty"],
)  # fmt: skip
def test_apply_refuses_what_the_tunnels_would_not_enforce(
    ctl: Ctl, unchanged: None, text: str, says: str
) -> None:
    done = ctl("apply", CF, "-f", "-", stdin=text)
    assert done.returncode == 1
    assert says in done.stderr
    assert done.stdout == ""


def test_apply_defaults_the_namespace_dry_runs_waits_and_delete_f_removes(
    cluster: mesh.Cluster, ctl: Ctl, tmp_path: Path
) -> None:
    policy = write(tmp_path, "p.yaml", docs(authz("no-ns", ns=None)))
    before = snapshot(cluster)
    dry = ctl("apply", CF, "-f", policy, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout == "AuthorizationPolicy default/no-ns created (dry run)\n"
    assert snapshot(cluster) == before

    done = ctl("apply", CF, "-f", policy, "--wait", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("AuthorizationPolicy default/no-ns created\n")
    # --wait returned: the tunnel runs exactly the file just written.
    assert config_of(cluster) == {"digest": digest(cluster), "rejected": None}
    # In `default`, as kubectl puts it: not the root namespace, so not mesh-wide.
    [entry] = [p for p in mesh.read_policies(cluster) if p["metadata"]["name"] == "no-ns"]
    assert entry["metadata"]["namespace"] == "default"
    _, dump = mesh.node_http(cluster.layout, "n1", ADMIN_PORT, "/config_dump")
    [loaded] = [p for p in json.loads(dump)["policies"] if p["name"] == "no-ns"]
    assert loaded["namespace"] == "default" and loaded["scope"] == "NAMESPACE"
    again = ctl("apply", CF, "-f", policy)
    assert again.stdout == "AuthorizationPolicy default/no-ns unchanged\n"

    gone = ctl("delete", CF, "-f", policy, "--wait")
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.startswith("AuthorizationPolicy default/no-ns deleted\n")
    assert mesh.read_policies(cluster) == []
    after = snapshot(cluster)
    absent = ctl("delete", CF, "-f", policy)
    assert absent.returncode == 1
    assert "no AuthorizationPolicy default/no-ns" in absent.stderr
    assert "nothing was deleted" in absent.stderr
    by_name = ctl("delete", CF, "authorizationpolicy", "mesh/never")
    assert by_name.returncode == 1 and "no AuthorizationPolicy mesh/never" in by_name.stderr
    assert snapshot(cluster) == after


def test_a_hand_broken_mesh_config_is_reported_and_the_next_change_heals_it(
    cluster: mesh.Cluster, ctl: Ctl
) -> None:
    """What `apply` of an unknown kind once did: every later change was ignored."""
    doc = yaml.safe_load(cluster.paths.xds.read_text())
    doc["policies"].append(SIDECAR)
    tmp = cluster.paths.xds.with_suffix(".hand")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(cluster.paths.xds)
    bad = digest(cluster)
    wait_until_sync(
        lambda: (config_of(cluster).get("rejected") or {}).get("digest") == bad, "the refusal"
    )

    status = ctl("status", CF)
    assert status.returncode == 1
    assert "node n1: the tunnel refused the mesh config" in status.stderr
    assert "'Sidecar' is not one of AuthorizationPolicy" in status.stderr

    # A label change regenerates the config from the records: the pod is enrolled.
    try:
        done = ctl("label", CF, "namespace", "plain", "istio.io/dataplane-mode=ambient")
        assert done.returncode == 0, done.stderr
        assert "Sidecar" not in cluster.paths.xds.read_text()
        wait_until_sync(
            lambda: config_of(cluster).get("digest") == digest(cluster), "the new config"
        )
        assert config_of(cluster)["rejected"] is None
        mesh.wait_ready(cluster)
        _, dump = mesh.node_http(cluster.layout, "n1", ADMIN_PORT, "/config_dump")
        protocols = {w["name"]: w["protocol"] for w in json.loads(dump)["workloads"]}
        assert protocols == {"a": "HBONE", "b": "HBONE"}
        assert ctl("status", CF).returncode == 0
    finally:
        ctl("label", CF, "namespace", "plain", "istio.io/dataplane-mode-")
        mesh.wait_ready(cluster)


# ---- labels ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "says"),
    [
        (["a=b=c"], "value 'b=c'"),
        (["a b=c"], "label key 'a b'"),
        (["k" * 300 + "=v"], "longer than 63 characters"),
        (["istio.io/dataplane-mode=AMBIENT"], "must be one of ambient, none"),
        (["app=ok", "bad key=1", "x=y"], "label key 'bad key'"),
    ],
    ids=["a=b=c", "space in key", "300-character key", "AMBIENT", "one bad of three"],
)
def test_label_syntax_is_kubernetes_and_a_list_is_all_or_nothing(
    ctl: Ctl, unchanged: None, labels: list[str], says: str
) -> None:
    done = ctl("label", CF, "namespace", "plain", *labels)
    assert done.returncode == 2
    assert says in done.stderr


def test_label_of_an_unknown_target_lists_the_known_ones(ctl: Ctl, unchanged: None) -> None:
    ns = ctl("label", CF, "namespace", "nope", "x=y")
    assert (
        ns.returncode == 1
        and "no namespace 'nope' in cluster clix (namespaces: mesh, plain)" in ns.stderr
    )
    pod = ctl("label", CF, "pod", "mesh/nope", "x=y")
    assert (
        pod.returncode == 1
        and "no pod mesh/nope in cluster clix (pods: mesh/a, plain/b)" in pod.stderr
    )


# ---- exec, stopped clusters, files that are not text, sizes -----------------------------------


def test_exec_errors_are_messages(ctl: Ctl, unchanged: None, tmp_path: Path) -> None:
    pod = ctl("exec", CF, "mesh/zz", "--", "true")
    assert pod.returncode == 1
    assert "no pod mesh/zz in cluster clix (pods: mesh/a, plain/b)" in pod.stderr
    cmd = ctl("exec", CF, "mesh/a", "--", "/no/such/program")
    assert cmd.returncode == 1 and "command '/no/such/program' not found" in cmd.stderr
    assert ctl("exec", CF, "mesh/a").returncode == 2
    ok = ctl("exec", CF, "mesh/a", "--", sys.executable, "-c", "print('inside')")
    assert (ok.returncode, ok.stdout) == (0, "inside\n")
    stopped = write(tmp_path, "stopped.yaml", CLUSTER_FILE.read_text().replace("clix", "clistop"))
    down = ctl("exec", stopped, "mesh/a", "--", "true")
    assert down.returncode == 1
    assert f"cluster clistop is not running under {ctl.state_root} (ambientctl up {stopped})" in (
        down.stderr
    )
    assert not (ctl.state_root / "clistop").exists()  # looking created nothing


def test_files_that_are_not_text_or_too_large_are_refused_before_parsing(
    ctl: Ctl, unchanged: None, tmp_path: Path
) -> None:
    binary = write(tmp_path, "bin.yaml", bytes(range(256)) * 8)
    for args in (("status", binary), ("up", binary), ("apply", CF, "-f", binary)):
        done = ctl(*args)
        assert done.returncode == 1 and "is not a text file (not UTF-8)" in done.stderr, args
    big = write(tmp_path, "big.yaml", "# padding\n" * 110_000 + CLUSTER_FILE.read_text())
    done = ctl("up", big)
    assert done.returncode == 1 and "is larger than the 1 MiB limit" in done.stderr
    done = ctl("apply", CF, "-f", "-", stdin="#" * (2 << 20))
    assert done.returncode == 1 and "policy file (stdin) is larger than the 1 MiB" in done.stderr


# ---- ownership: down and up by name -----------------------------------------------------------


def test_down_of_a_name_that_prefixes_the_clusters_namespaces_touches_nothing(
    cluster: mesh.Cluster, ctl: Ctl, unchanged: None
) -> None:
    """clix-n1 never existed; clix-n1-p1 and -p2 are clix's pods."""
    done = ctl("down", f"{NAME}-n1")
    assert (done.returncode, done.stdout) == (
        0,
        f"nothing to do: no cluster clix-n1 under {ctl.state_root}\n",
    )
    assert ctl("status", CF).returncode == 0


def test_up_refuses_a_name_that_collides_and_builds_nothing(
    ctl: Ctl, unchanged: None, tmp_path: Path
) -> None:
    collides = write(
        tmp_path, "c.yaml", CLUSTER_FILE.read_text().replace("name: clix", "name: clix-n1")
    )
    done = ctl("up", collides)
    assert done.returncode == 1
    assert "cluster name 'clix-n1' collides with running cluster 'clix'" in done.stderr
    again = ctl("up", CF)
    assert again.returncode == 1 and "cluster clix is already up" in again.stderr


# ---- failed up --------------------------------------------------------------------------------


def _cluster(name: str, command: list[str]) -> str:
    return yaml.safe_dump(
        {
            "name": name,
            "nodes": [{"name": "n1"}],
            "namespaces": [{"name": "plain"}],
            "pods": [
                {"name": "app", "namespace": "plain", "node": "n1", "labels": {"app": "app"},
                 "command": command},
            ],
            "services": [
                {"name": "app", "namespace": "plain", "selector": {"app": "app"},
                 "ports": [{"port": 80, "targetPort": 8080}]},
            ],
        }
    )  # fmt: skip


def test_up_with_a_pod_command_that_does_not_exist_builds_nothing(ctl: Ctl, tmp_path: Path) -> None:
    cfile = write(tmp_path, "nocmd.yaml", _cluster("clinocmd", ["no-such-program", "x"]))
    done = ctl("up", "--no-mesh", cfile)
    assert done.returncode == 1
    assert "pod plain/app: command 'no-such-program' is not on PATH" in done.stderr
    assert not [n for n in pr_netns.listnetns() if n.startswith("clinocmd-")]


def test_failed_up_names_the_pod_and_keeps_its_logs(ctl: Ctl, tmp_path: Path) -> None:
    cfile = write(
        tmp_path,
        "exits.yaml",
        _cluster("cliexit", ["{python}", "-c", "print('bad config'); raise SystemExit(3)"]),
    )
    done = ctl("up", "--no-mesh", cfile)
    assert done.returncode == 1
    assert (
        "the app of pod plain/app exited with code 3 before listening on port 8080" in done.stderr
    )
    kept = ctl.state_root / "cliexit" / "failed-up-logs"
    assert f"the logs are kept in {kept}" in done.stderr
    assert (kept / "app-plain-app.log").read_text() == "bad config\n"
    assert not [n for n in pr_netns.listnetns() if n.startswith("cliexit-")]
    assert ctl("down", "cliexit").stdout.startswith("nothing to do")


def test_usage_errors_exit_2(ctl: Ctl, unchanged: None) -> None:
    for args in (("delete", CF), ("delete", CF, "authorizationpolicy"), ("nosuchcommand",)):
        done = ctl(*args)
        assert done.returncode == 2, args
