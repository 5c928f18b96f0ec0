"""`ambientctl explain` as read: each endpoint's delivery (in-process or HBONE), dry-run
policies in words, and a client outside the mesh with the destination's plaintext verdict
and its warning. The answers come from the tunnel's own `explain` on a fixed mesh (no
sockets), rendered and compared with golden files."""

from __future__ import annotations

from dataclasses import replace

from ambientctl.views import render_explain
from meshcore.defaults import ROOT_NAMESPACE
from meshcore.policy.index import PolicyIndex
from meshcore.state import RawPolicy, TunnelProtocol, Workload
from tests.ambientctl.golden import check
from tests.support.mesh import (
    CLIENT_POD,
    LEGACY_SERVICE,
    WEB_SERVICE,
    authorization_policy,
    ips,
    mesh_state,
    web_pod,
)
from ztunnel.explain import PLAINTEXT_WARNING, explain

WEB_0 = web_pod("web-0", "10.244.2.20")
WEB_1 = web_pod("web-1", "10.244.1.21", node="node1")
OUTSIDER = replace(
    CLIENT_POD,
    uid="Kubernetes//Pod/shop/outsider",
    name="outsider",
    ips=ips("10.244.1.99"),
    protocol=TunnelProtocol.NONE,
)
DRY_DENY = authorization_policy(
    "deny-client-dry",
    {
        "action": "DENY",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}],
    },
    "shop",
    annotations={"istio.io/dry-run": "true"},
)
ONLY_CLIENT = authorization_policy(
    "only-client",
    {
        "action": "ALLOW",
        "rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}],
    },
    "shop",
)


def answer(source: str, destination: str, *policies: RawPolicy) -> dict[str, object]:
    state = mesh_state(
        (CLIENT_POD, WEB_0, WEB_1, OUTSIDER), (WEB_SERVICE, LEGACY_SERVICE), policies
    )
    index = PolicyIndex.build(state, ROOT_NAMESPACE)

    def same_node(src: Workload, dst: Workload) -> bool:
        return src.node == dst.node

    return explain(state, index, source, destination, in_process=same_node)


def test_each_endpoint_says_how_it_is_delivered_and_dry_runs_read_as_words() -> None:
    doc = answer("shop/client-0", "web:80", DRY_DENY)
    text = render_explain(doc)
    assert "delivery:       in-process" in text and "delivery:       hbone" in text
    assert '{"' not in text  # no raw JSON
    check("explain_delivery", text)


def test_a_client_outside_the_mesh_gets_the_plaintext_verdict_and_a_warning() -> None:
    doc = answer("shop/outsider", "web:80", ONLY_CLIENT)
    text = render_explain(doc)
    # The namespace rule cannot match a client without an identity: denied, and said why.
    assert text.count("authorization:  DENIED") == 2
    assert f"Warning:      {PLAINTEXT_WARNING}" in text
    check("explain_outside_the_mesh", text)
