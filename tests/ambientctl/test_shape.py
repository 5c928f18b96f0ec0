"""The kubectl-shaped command line, the pure part: help on every subcommand and argument,
--version, completion, how positionals are dealt (a cluster file or not), the kinds and
their short names, every table from fixed data (golden files), the current cluster, and the
exit codes of commands that fail before reaching a cluster."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ambientctl import cli, context, contextcmds, kinds, statusview, tables
from ambientctl import resourceviews as rv
from ambientctl.completion import bash_script, subcommands, walk, zsh_script
from ambientctl.kubefetch import KubeTarget
from tests.ambientctl.golden import check

HERE = Path(__file__).parent
SHAPE = HERE / "shape.yaml"


# ---- help, version, completion ----------------------------------------------------------------


def test_every_subcommand_and_argument_has_help() -> None:
    missing = []
    for path, parser in walk(cli.build_parser()):
        where = " ".join(("ambientctl", *path))
        if path and not parser.description:
            missing.append(f"{where}: no description")
        if (
            path
            and not subcommands(parser)
            and not (parser.epilog or "").startswith("examples:")
            and "examples:" not in (parser.epilog or "")
        ):
            missing.append(f"{where}: no examples")
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                missing += [f"{where} {c.dest}: no help" for c in a._choices_actions if not c.help]
            elif not a.help:
                missing.append(f"{where} {a.option_strings or a.dest}: no help")
    assert not missing, "\n".join(missing)


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"ambientctl {importlib.metadata.version('ambient-mesh')}\n"


def test_help_exits_0_and_a_bad_command_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["get", "--help"]) == 0
    assert "examples:" in capsys.readouterr().out
    assert cli.main(["nosuchcommand"]) == 2


def test_completion_is_the_parser_tree(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    script = bash_script(parser)
    for name in subcommands(parser):
        assert f'":{name}") path="{name}"' in script
    assert '"waypoint:apply") path="waypoint apply"' in script
    # The options and kinds offered where they apply.
    get_line = next(line for line in script.splitlines() if line.strip().startswith('"get")'))
    for word in ("--show-labels", "-A" if False else "--all-namespaces", "ap", "httproutes", "svc"):
        assert f" {word}" in get_line or f'"{word}' in get_line, word
    assert zsh_script(parser).startswith("# ambientctl completion (zsh)")
    assert "bashcompinit" in zsh_script(parser)
    assert cli.main(["completion", "bash"]) == 0
    assert capsys.readouterr().out == script
    bash = shutil.which("bash")
    assert bash is not None
    done = subprocess.run([bash, "-n"], input=script, text=True, capture_output=True)
    assert done.returncode == 0, done.stderr


def test_completion_answers_in_bash() -> None:
    """The script run by bash completes a subcommand's options and a kind."""
    bash = shutil.which("bash")
    assert bash is not None
    script = bash_script(cli.build_parser())
    probe = (
        script
        + 'COMP_WORDS=(ambientctl get h); COMP_CWORD=2; _ambientctl; echo "${COMPREPLY[*]}"\n'
        + 'COMP_WORDS=(ambientctl waypoint l); COMP_CWORD=2; _ambientctl; echo "${COMPREPLY[*]}"\n'
    )
    out = subprocess.run([bash], input=probe, text=True, capture_output=True, check=True).stdout
    first, second = out.splitlines()
    assert "hr" in first.split() and "httproutes" in first.split()
    assert second.split() == ["list"]


# ---- positionals: a cluster file or the command's own ------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    args, extra = cli.build_parser().parse_known_args(list(argv))
    assert context.settle(args, extra) == []
    return args


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["label", "namespace", "shop", "a=b", "c=d"],
         {"cluster_file": None, "kind": "namespace", "name": "shop", "labels": ["a=b", "c=d"]}),
        (["label", "c.yaml", "namespace", "shop", "a=b"],
         {"cluster_file": "c.yaml", "kind": "namespace", "name": "shop", "labels": ["a=b"]}),
        (["label", "namespace", "shop", "a=b"],
         {"cluster_file": None, "kind": "namespace", "labels": ["a=b"]}),
        (["delete", "ap", "shop/x"], {"cluster_file": None, "kind": "ap", "name": "shop/x"}),
        (["delete", "shp", "ap", "shop/x"],
         {"cluster_file": "shp", "kind": "ap", "name": "shop/x"}),
        (["delete", "c.yaml", "-f", "p.yaml"],
         {"cluster_file": "c.yaml", "kind": None, "filename": "p.yaml"}),
        (["get", "ap", "-n", "shop", "x"],
         {"cluster_file": None, "kind": "ap", "name": "x", "namespace": "shop"}),
        (["get", "c.yaml", "svc"], {"cluster_file": "c.yaml", "kind": "svc", "name": None}),
        (["get", "svc", "web"], {"cluster_file": None, "kind": "svc", "name": "web"}),
        (["describe", "svc", "-n", "shop", "web"], {"kind": "svc", "name": "web"}),
        (["exec", "shop/a", "--", "python3", "-V"],
         {"cluster_file": None, "pod": "shop/a", "command": ["python3", "-V"]}),
        (["exec", "c.yaml", "shop/a", "--", "python3"],
         {"cluster_file": "c.yaml", "pod": "shop/a", "command": ["python3"]}),
        (["explain", "shop/a", "b:80"],
         {"cluster_file": None, "source": "shop/a", "destination": "b:80"}),
        (["explain", "shp", "shop/a", "b:80"], {"cluster_file": "shp", "source": "shop/a"}),
        (["status", "shp"], {"cluster_file": "shp"}),
        (["status", "--cluster", "shp"], {"cluster_file": None, "cluster_name": "shp"}),
        (["--cluster", "shp", "status"], {"cluster_name": "shp"}),
        (["waypoint", "delete", "-n", "shop", "a", "b"],
         {"cluster_file": None, "names": ["a", "b"]}),
        (["logs", "ztunnel"], {"cluster_file": None, "target": "ztunnel"}),
        (["logs", "c.yaml", "shop/a"], {"cluster_file": "c.yaml", "target": "shop/a"}),
        (["metrics", "istio_tcp"], {"cluster_file": None, "name_filter": "istio_tcp"}),
        (["metrics", "c.yaml"], {"cluster_file": "c.yaml", "name_filter": None}),
        (["metrics", "c.yaml", "istio_tcp"],
         {"cluster_file": "c.yaml", "name_filter": "istio_tcp"}),
        (["access-log", "--pod", "shop/a"], {"cluster_file": None, "pod": "shop/a"}),
    ],
)  # fmt: skip
def test_positionals_are_dealt_as_the_user_meant(argv: list[str], want: dict[str, Any]) -> None:
    args = parse(*argv)
    assert {k: getattr(args, k) for k in want} == want


def test_reassign_deals_like_argparse() -> None:
    fields = (("kind", "1"), ("name", "?"))
    assert context.reassign(["ap"], fields) == {"kind": "ap", "name": None}
    assert context.reassign(["ap", "x"], fields) == {"kind": "ap", "name": "x"}
    assert context.reassign(["ap", "x", "y"], fields) is None
    assert context.reassign([], fields) is None
    assert context.reassign(["a"], (("k", "1"), ("l", "+"))) is None


# ---- kinds --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "kind"),
    [("ap", "AuthorizationPolicy"), ("AuthorizationPolicies", "AuthorizationPolicy"),
     ("pa", "PeerAuthentication"), ("ra", "RequestAuthentication"), ("hr", "HTTPRoute"),
     ("grpcroute", "GRPCRoute"), ("dr", "DestinationRule"), ("vs", "VirtualService"),
     ("se", "ServiceEntry"), ("gw", "Gateway"), ("svc", "Service"), ("ns", "Namespace"),
     ("wl", "Workload"), ("workloads", "Workload"), ("nodes", "Node"), ("wp", "Waypoint"),
     ("po", "Pod"), ("pod", "Pod"), ("clusters", "Cluster")],
)  # fmt: skip
def test_kinds_take_kubectls_spellings(word: str, kind: str) -> None:
    assert kinds.resolve(word).kind == kind


def test_an_unknown_kind_lists_the_known_ones() -> None:
    with pytest.raises(kinds.UnknownKind, match=r"authorizationpolicies \(ap\)"):
        kinds.resolve("sidecar")
    assert {k.kind for k in kinds.KINDS if k.is_document} == {
        "AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication", "HTTPRoute",
        "GRPCRoute", "VirtualService", "DestinationRule", "ServiceEntry", "Gateway",
    }  # fmt: skip


# ---- tables (golden) ----------------------------------------------------------------------------


def test_tables_are_kubectl_shaped() -> None:
    text = tables.render(["name", "Ready", "age"], [["a", "1/1", "3s"], ["longer-name", "", "x"]])
    check("tables_basic", text)
    lines = text.splitlines()
    assert lines[0].startswith("NAME          READY")  # upper case, 3 spaces at least
    assert all(line == line.rstrip() for line in lines)
    assert tables.render(["NAME"], []) == "No resources found.\n"
    assert tables.labels_text({"b": "2", "a": "1"}) == "a=1,b=2"
    assert tables.labels_text({}) == "<none>"


def doc(
    kind: str, api: str, ns: str, name: str, spec: dict[str, Any], **meta: Any
) -> dict[str, Any]:
    return {"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": ns, **meta},
            "spec": spec}  # fmt: skip


SEC, NET, GWAPI = "security.istio.io/v1", "networking.istio.io/v1", "gateway.networking.k8s.io/v1"
DOCS: dict[str, list[dict[str, Any]]] = {
    "AuthorizationPolicy": [
        doc("AuthorizationPolicy", SEC, "travel", "deny-legacy",
            {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["legacy"]}}]}]},
            labels={"team": "sec"}),
        doc("AuthorizationPolicy", SEC, "travel", "allow-frontend",
            {"selector": {"matchLabels": {"app": "pricing"}}, "rules": [{}, {}]}),
        doc("AuthorizationPolicy", SEC, "shop", "l7",
            {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                             "name": "waypoint"}], "action": "ALLOW", "rules": [{}]}),
    ],
    "PeerAuthentication": [
        doc("PeerAuthentication", SEC, "travel", "strict", {"mtls": {"mode": "STRICT"}}),
        doc("PeerAuthentication", SEC, "shop", "ports",
            {"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "PERMISSIVE"},
             "portLevelMtls": {"5432": {"mode": "STRICT"}}}),
    ],
    "RequestAuthentication": [
        doc("RequestAuthentication", SEC, "shop", "jwt",
            {"targetRefs": [{"kind": "Gateway", "name": "waypoint"}],
             "jwtRules": [{"issuer": "https://issuer.example"}]}),
    ],
    "HTTPRoute": [
        doc("HTTPRoute", GWAPI, "shop", "web",
            {"parentRefs": [{"kind": "Service", "group": "", "name": "web"}],
             "hostnames": ["web.shop"], "rules": [{}, {}]}),
    ],
    "GRPCRoute": [
        doc("GRPCRoute", GWAPI, "shop", "echo",
            {"parentRefs": [{"kind": "Service", "name": "echo"}], "rules": [{}]}),
    ],
    "VirtualService": [
        doc("VirtualService", NET, "shop", "reviews", {"hosts": ["reviews"], "http": []}),
    ],
    "DestinationRule": [
        doc("DestinationRule", NET, "shop", "reviews",
            {"host": "reviews.shop.svc.cluster.local",
             "subsets": [{"name": "v1"}, {"name": "v2"}]}),
    ],
    "ServiceEntry": [
        doc("ServiceEntry", NET, "shop", "ext",
            {"hosts": ["api.example.com"], "addresses": ["240.0.0.1"],
             "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
             "resolution": "DNS"}),
    ],
    "Gateway": [
        doc("Gateway", GWAPI, "shop", "waypoint",
            {"gatewayClassName": "istio-waypoint",
             "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
            labels={"istio.io/waypoint-for": "service"}),
    ],
}  # fmt: skip
STATUS = {
    ("shop", "web"): "Accepted, ResolvedRefs",
    ("shop", "reviews"): "Accepted=False Conflicted: HTTPRoute shop/web targets it and wins",
    ("shop", "waypoint"): "10.96.0.100 True",
}


@pytest.mark.parametrize("kind", sorted(DOCS))
def test_document_tables(kind: str) -> None:
    columns, _ = rv.DOCUMENT_COLUMNS[kind]
    rows = rv.document_rows(kind, DOCS[kind], STATUS)
    name = kinds.resolve(kind).plural
    check(f"get_{name}", rv.render(columns, rows, with_namespace=False))
    check(
        f"get_{name}_all_wide_labels",
        rv.render(columns, rows, with_namespace=True, wide=True, show_labels=True),
    )


def test_document_output_is_a_v1_list_in_json_and_yaml() -> None:
    docs = DOCS["HTTPRoute"]
    assert json.loads(rv.dump(rv.as_list(docs), "json")) == {
        "apiVersion": "v1", "kind": "List", "items": docs,
    }  # fmt: skip
    check("get_httproutes_yaml", rv.dump(docs[0], "yaml"))


def test_empty_results_say_where_they_looked() -> None:
    columns, _ = rv.DOCUMENT_COLUMNS["AuthorizationPolicy"]
    text = rv.render(columns, [], with_namespace=False, empty=rv.empty_message("travel"))
    assert text == "No resources found in travel namespace.\n"
    assert rv.empty_message(None) == "No resources found."


SERVICES: list[dict[str, Any]] = [
    {"namespace": "shop", "name": "web", "clusterIP": "10.96.0.10",
     "ports": [{"port": 80, "targetPort": 9000, "name": ""}], "selector": {"app": "web"},
     "labels": {"istio.io/use-waypoint": "waypoint"}, "waypoint": "shop/waypoint",
     "endpoints": "1/2", "pods": ["shop/web-0", "shop/web-1"]},
    {"namespace": "travel", "name": "pricing", "clusterIP": "10.96.0.11",
     "ports": [{"port": 80, "targetPort": 8080, "name": "http"},
               {"port": 9090, "targetPort": 9090, "name": "grpc"}],
     "selector": {"app": "pricing"}, "labels": {}, "waypoint": None, "endpoints": "-",
     "pods": []},
]  # fmt: skip
NAMESPACES: list[dict[str, Any]] = [
    {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient",
                                "istio.io/use-waypoint": "waypoint"}},
    {"name": "legacy", "labels": {}},
]  # fmt: skip
NODES: list[dict[str, Any]] = [
    {"name": "n1", "ip": "10.10.0.11", "podCIDR": "10.244.1.0/24", "ready": True,
     "config": "890a48e30f8d4f9f1e44382f3b2eadb7", "pods": 3},
    {"name": "n2", "ip": "10.10.0.12", "podCIDR": "10.244.2.0/24", "ready": False,
     "config": None, "pods": 0},
]  # fmt: skip
WORKLOADS: list[dict[str, Any]] = [
    {"namespace": "shop", "name": "web-0", "ips": ["10.244.1.11"], "node": "n1",
     "waypoint": "shop/waypoint.shop.svc.cluster.local", "protocol": "HBONE",
     "identity": "spiffe://cluster.local/ns/shop/sa/web", "status": "HEALTHY",
     "labels": {"app": "web"}},
    {"namespace": "legacy", "name": "db", "ips": ["10.244.2.30"], "node": "n2",
     "waypoint": None, "protocol": "TCP", "identity": "spiffe://cluster.local/ns/legacy/sa/db",
     "status": "UNHEALTHY"},
]  # fmt: skip


def test_object_tables() -> None:
    for name, columns, rows in (
        ("services", rv.SERVICE_COLUMNS, rv.service_rows(SERVICES)),
        ("namespaces", rv.NAMESPACE_COLUMNS, rv.namespace_rows(NAMESPACES)),
        ("nodes", rv.NODE_COLUMNS, rv.node_rows(NODES)),
        ("workloads", rv.WORKLOAD_COLUMNS, rv.workload_rows(WORKLOADS)),
    ):
        namespaced = name in ("services", "workloads")
        check(f"get_{name}", rv.render(columns, rows, with_namespace=False))
        check(
            f"get_{name}_all_wide_labels",
            rv.render(columns, rows, with_namespace=namespaced, wide=True, show_labels=True),
        )


def test_healthy_endpoints_count_as_istioctl_does() -> None:
    service = {"endpoints": ["shop/a", "shop/b", "shop/gone"]}
    workloads = [{"uid": "shop/a", "status": "HEALTHY"}, {"uid": "shop/b", "status": "UNHEALTHY"}]
    assert rv.healthy_endpoints(service, workloads) == "1/3"


def test_describe_layout() -> None:
    check("describe_httproute", rv.describe_document(
        DOCS["HTTPRoute"][0],
        [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": ""}],
    ))  # fmt: skip
    check("describe_authorizationpolicy", rv.describe_document(DOCS["AuthorizationPolicy"][0]))
    text = rv.describe([("Name", "web"), ("Labels", "<none>"), ("Empty", ""), ("Pods", ["a"])])
    assert text == "Name:   web\nLabels: <none>\nEmpty:  <none>\nPods:\n  - a\n"


# ---- status (golden) ----------------------------------------------------------------------------

READY_TUNNEL = {"ready": True, "config": {"digest": "a" * 64, "rejected": None}}
ENROLLED = {"state": "enrolled", "reason": ""}


def test_status_of_a_healthy_cluster() -> None:
    st = statusview.status(
        [
            statusview.NodeState(
                "n1",
                READY_TUNNEL,
                {"pods": {"c//Pod/shop/a": ENROLLED, "c//Pod/shop/b": ENROLLED}},
                None,
                [statusview.WaypointState("shop/waypoint", True)],
            ),
            statusview.NodeState("n2", READY_TUNNEL, {"pods": {}}),
        ]
    )
    assert st.ok and not st.refused
    check("status_ok", statusview.render(st))


def test_status_shows_every_problem() -> None:
    refused = {
        "ready": True,
        "config": {"digest": "b" * 64, "rejected": {"digest": "c" * 64, "error": "bad"}},
    }
    st = statusview.status(
        [
            statusview.NodeState(
                "n1",
                refused,
                {
                    "pods": {
                        "c//Pod/shop/a": ENROLLED,
                        "c//Pod/shop/b": {"state": "pending", "reason": "no tunnel"},
                        "c//Pod/shop/c": {"state": "failed", "reason": "iptables: exit 4"},
                    }
                },
                "the tunnel refused the mesh config cccccccccccc: bad; it keeps running bbb",
                [statusview.WaypointState("shop/waypoint", False, "NotRunning")],
            ),
            statusview.NodeState("n2", None, None),
            statusview.NodeState("n3", {"ready": False, "config": {}}, {"pods": {}}),
        ]
    )
    check("status_problems", statusview.render(st))
    check("status_problems_messages", "\n".join(st.problems) + "\n")
    assert st.refused and not st.ok
    assert not statusview.not_running(
        [statusview.NodeState("n1", None, None), statusview.NodeState("n2", READY_TUNNEL, None)]
    )
    assert statusview.not_running([statusview.NodeState("n1", None, None)])


# ---- the current cluster ------------------------------------------------------------------------


def fake_cluster(root: Path, name: str, netns: list[str] | None = None) -> None:
    """A cluster's record as `up` leaves it (no namespaces exist: it is stopped)."""
    d = root / name
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"cluster": name, "netns": netns or []}))
    (d / "spec.json").write_text(
        json.dumps({"file": str(SHAPE), "text": SHAPE.read_text().replace("shp", name)})
    )


def ctl(capsys: pytest.CaptureFixture[str], root: Path, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["--state-root", str(root), *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_use_remembers_a_cluster_by_name_or_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(capsys, tmp_path, "use") == (
        1,
        "no current cluster (ambientctl use NAME|FILE)\n",
        "",
    )
    rc, _, err = ctl(capsys, tmp_path, "use", "nope")
    assert rc == 1 and "no cluster nope under" in err and "(clusters there: none)" in err
    fake_cluster(tmp_path, "alpha")
    fake_cluster(tmp_path, "beta")
    assert ctl(capsys, tmp_path, "use", "alpha", "-n", "shop") == (
        0, "current cluster: alpha, namespace shop\n", "",
    )  # fmt: skip
    assert context.read_current(tmp_path) == context.Current(cluster="alpha", namespace="shop")
    assert ctl(capsys, tmp_path, "use")[1] == "current cluster: alpha, namespace shop\n"
    rc, out, _ = ctl(capsys, tmp_path, "clusters")
    assert rc == 0
    check("clusters", out.replace(str(SHAPE), "/x/shape.yaml"))
    rc, out, _ = ctl(capsys, tmp_path, "use", str(SHAPE))
    assert (rc, out) == (0, f"current cluster: shp (file {SHAPE})\n")
    # A stopped cluster is said to be not running, by name or as the current one.
    rc, _, err = ctl(capsys, tmp_path, "get", "svc", "--cluster", "alpha")
    assert rc == 1 and "cluster alpha is not running under" in err
    rc, _, err = ctl(capsys, tmp_path, "status")
    assert rc == 1 and "cluster shp is not running under" in err
    assert ctl(capsys, tmp_path, "use", "--clear")[:2] == (0, "no current cluster\n")
    rc, _, err = ctl(capsys, tmp_path, "label", "namespace", "shop", "a=b")
    assert rc == 2 and "no cluster given" in err


def test_a_current_kubernetes_cluster_is_used_without_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kubeconfig = tmp_path / "kc"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    rc, out, _ = ctl(capsys, tmp_path, "use", "--kubeconfig", str(kubeconfig), "--context", "c")
    assert (rc, out) == (0, f"current cluster: Kubernetes cluster of {kubeconfig} (context c)\n")
    args = parse("--state-root", str(tmp_path), "workloads")
    assert cli._kube_target(args) == KubeTarget(kubeconfig, "c")
    args = parse("--state-root", str(tmp_path), "get", "pods")
    assert cli._kube_target(args) == KubeTarget(kubeconfig, "c")
    assert (args.kubeconfig, args.context) == (str(kubeconfig), "c")
    # A local cluster named on the command line still wins.
    args = parse("--state-root", str(tmp_path), "workloads", "--cluster", "shp")
    assert cli._kube_target(args) is None
    # A local-only command says the current cluster is not local.
    rc, _, err = ctl(capsys, tmp_path, "label", "namespace", "shop", "a=b")
    assert rc == 2 and "the current cluster is a Kubernetes cluster" in err
    rc, _, err = ctl(capsys, tmp_path, "use", "--kubeconfig", str(tmp_path / "none"))
    assert rc == 2 and "no kubeconfig" in err


def test_cluster_rows_mark_the_current_one() -> None:
    infos = [
        contextcmds.ClusterInfo("a", True, "mesh", 2, 5, "/x/a.yaml"),
        contextcmds.ClusterInfo("k", False, "kubernetes", None, None, None),
    ]
    rows = contextcmds.cluster_rows(infos, context.Current(kubeconfig="/k", context="c"))
    assert [r[0] for r in rows] == ["", "", "*"] and rows[2][-1] == "/k (context c)"
    rows = contextcmds.cluster_rows(infos, context.Current(cluster="k"))
    assert [r[0] for r in rows] == ["", "*"]


# ---- exit codes before any cluster is reached --------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["get", "sidecars", "--cluster", "x"], "unknown resource type 'sidecars'"),
        (["describe", "svc", "--cluster", "x"], "the following arguments are required"),
        (["get", "ap", "a/b", "-n", "c", "--cluster", "x"], "is in namespace a, not c"),
        (["delete", "svc", "web", "--cluster", "x"], "services are not deleted this way"),
        (["delete", "ap", "--cluster", "x"], "give KIND NAMESPACE/NAME"),
        (["label", "deployment", "x", "a=b", "--cluster", "x"], "kind 'deployment'"),
        (["get", "c.yaml", "ap", "--cluster", "a"], "give the cluster once"),
        (["status", "-o", "yaml"], "invalid choice"),
        (["use", "x", "--kubeconfig", "k"], "not both"),
        (["get", "ap", "x", "y", "z"], "unrecognized arguments"),
    ],
)
def test_usage_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    rc, _, err = ctl(capsys, tmp_path, *argv)
    assert rc == 2, err
    assert says in err


def test_a_kubernetes_mode_cluster_is_reached_through_its_kubeconfig(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_cluster(tmp_path, "kind1")
    kubeconfig = tmp_path / "kind1" / "kube" / "kubeconfig"
    kubeconfig.parent.mkdir()
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    rc, out, _ = ctl(capsys, tmp_path, "use", "kind1")
    assert (rc, out) == (0, f"current cluster: kind1 (Kubernetes mode; kubeconfig {kubeconfig})\n")
    args = parse("--state-root", str(tmp_path), "status")
    assert cli._kube_target(args) == KubeTarget(kubeconfig, None)
    # Named on the command line, too.
    assert ctl(capsys, tmp_path, "use", "--clear")[0] == 0
    args = parse("--state-root", str(tmp_path), "services", "--cluster", "kind1")
    assert cli._kube_target(args) == KubeTarget(kubeconfig, None)
    rc, out, _ = ctl(capsys, tmp_path, "clusters", "-o", "json")
    assert json.loads(out)["clusters"][0]["mode"] == "kubernetes"


def test_use_n_changes_only_the_namespace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = ctl(capsys, tmp_path, "use", "-n", "shop")
    assert rc == 2 and "no current cluster" in err
    fake_cluster(tmp_path, "alpha")
    assert ctl(capsys, tmp_path, "use", "alpha")[0] == 0
    assert (
        ctl(capsys, tmp_path, "use", "-n", "shop")[1] == "current cluster: alpha, namespace shop\n"
    )
    args = parse("--state-root", str(tmp_path), "get", "ap")
    assert context.namespace(args, "default") == "shop"
    args = parse("--state-root", str(tmp_path), "get", "ap", "-n", "other")
    assert context.namespace(args, "default") == "other"


@pytest.mark.netns  # root: `down` takes the machine-wide cluster registry's lock
def test_down_forgets_the_current_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_cluster(tmp_path, "alpha")
    fake_cluster(tmp_path, "beta")
    assert ctl(capsys, tmp_path, "use", "alpha")[0] == 0
    rc, out, _ = ctl(capsys, tmp_path, "down", "beta")
    assert rc == 0 and "no longer the current" not in out
    rc, out, _ = ctl(capsys, tmp_path, "down", "alpha")
    assert rc == 0 and out.endswith("alpha is no longer the current cluster\n")
    assert context.read_current(tmp_path) is None
