"""The control plane against the real API server: CRDs, the computed mesh config, waypoint
objects and statuses. No kubelet runs: the tests bind pods to a Node object themselves and
patch their status (podIP, Ready) as a kubelet would."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest

from controlplane.controller import ControllerOptions, MeshController
from controlplane.install import WAYPOINT_CONTROLLER, cluster_role, install_crds
from kube import kinds
from kube.client import KubeApiError, KubeClient, load_kubeconfig
from kube.kinds import Kind
from localcluster.kube.apiserver import KubeControlPlane
from meshcore.discovery import parse_local_config
from meshcore.policy.authz import authorize
from meshcore.policy.index import PolicyIndex
from meshcore.sockets import SocketAddr
from meshcore.state import MeshState, TunnelProtocol
from tests.controlplane.kubeobjects import authorization_policy, http_route, waypoint_gateway

pytestmark = pytest.mark.kube

NODE = "cp-node1"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


async def until(pred: Callable[[], Any], within: float = 15.0, what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        got = pred()
        if got:
            return got
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not met in {within} s"
        await asyncio.sleep(0.02)


async def until_async(pred: Callable[[], Any], within: float = 15.0, what: str = "") -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        got = await pred()
        if got:
            return got
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not met in {within} s"
        await asyncio.sleep(0.1)


async def create_ns(c: KubeClient, labels: dict[str, str]) -> str:
    ns = "cp-" + secrets.token_hex(3)
    await c.create(kinds.NAMESPACE, {"metadata": {"name": ns, "labels": labels}})
    return ns


async def ensure_node(c: KubeClient) -> None:
    with contextlib.suppress(KubeApiError):  # 409: another test made it
        await c.create(kinds.NODE, {"metadata": {"name": NODE}})


async def running_pod(
    c: KubeClient,
    ns: str,
    name: str,
    ip: str,
    labels: dict[str, str],
    ports: dict[str, int] | None = None,
) -> None:
    body = {
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeName": NODE,
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "app",
                    "image": "app",
                    "ports": [{"name": k, "containerPort": v} for k, v in (ports or {}).items()],
                }
            ],
        },
    }
    for attempt in range(20):
        try:
            await c.create(kinds.POD, body, ns)
            break
        except KubeApiError as e:
            # A namespace's default ServiceAccount appears just after the namespace; a pod
            # created in between is refused for a moment.
            if attempt == 19 or "serviceaccount" not in e.message.replace(" ", "").lower():
                raise
            await asyncio.sleep(0.1)
    await kubelet_ready(c, ns, name, ip)


async def kubelet_ready(c: KubeClient, ns: str, name: str, ip: str) -> None:
    status = {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    await c.patch(kinds.POD, name, {"status": status}, ns, subresource="status")


@contextlib.asynccontextmanager
async def controller(
    cp: KubeControlPlane, out: Path
) -> AsyncIterator[tuple[KubeClient, MeshController]]:
    async with KubeClient(load_kubeconfig(cp.kubeconfig)) as c:
        await install_crds(c)
        await ensure_node(c)
        mc = MeshController(c, ControllerOptions(mesh_out=out))
        await mc.start()
        try:
            yield c, mc
        finally:
            await mc.stop()


def file_state(out: Path) -> MeshState | None:
    try:
        return parse_local_config(out.read_text())
    except FileNotFoundError:
        return None


# ---- CRDs ---------------------------------------------------------------------------------


async def _crds(cp: KubeControlPlane) -> None:
    async with KubeClient(load_kubeconfig(cp.kubeconfig)) as c:
        names = await install_crds(c)
        assert len(names) == 10
        assert await install_crds(c) == names  # idempotent
        gc = await c.get(kinds.GATEWAY_CLASS, "istio-waypoint")
        assert gc["spec"]["controllerName"] == WAYPOINT_CONTROLLER
        (accepted,) = gc["status"]["conditions"]
        assert (accepted["type"], accepted["status"]) == ("Accepted", "True")
        ns = await create_ns(c, {})
        spec_of = {
            "AuthorizationPolicy": {
                "action": "DENY",
                "rules": [{"to": [{"operation": {"ports": ["9"]}}]}],
            },
            "PeerAuthentication": {"mtls": {"mode": "STRICT"}},
            "RequestAuthentication": {"jwtRules": [{"issuer": "https://issuer.example"}]},
            "ServiceEntry": {
                "hosts": ["api.example.com"],
                "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
                "resolution": "DNS",
            },
            "DestinationRule": {
                "host": "api",
                "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}},
            },
            "VirtualService": {
                "hosts": ["api"],
                "http": [{"route": [{"destination": {"host": "api"}}]}],
            },
            "Gateway": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
            "HTTPRoute": {"parentRefs": [{"kind": "Service", "group": "", "name": "api"}]},
            "GRPCRoute": {"parentRefs": [{"kind": "Service", "group": "", "name": "api"}]},
        }
        kind_of = {
            k.kind: k
            for k in (
                kinds.AUTHORIZATION_POLICY,
                kinds.PEER_AUTHENTICATION,
                kinds.REQUEST_AUTHENTICATION,
                kinds.SERVICE_ENTRY,
                kinds.DESTINATION_RULE,
                kinds.VIRTUAL_SERVICE,
                kinds.GATEWAY,
                kinds.HTTP_ROUTE,
                kinds.GRPC_ROUTE,
            )
        }
        for kind_name, spec in spec_of.items():
            kind = kind_of[kind_name]
            obj = {
                "apiVersion": kind.api_version,
                "kind": kind_name,
                "metadata": {"name": "one"},
                "spec": spec,
            }
            made = await c.create(kind, obj, ns)
            assert made["spec"] == spec, kind_name
        # The older versions users still apply are served too (the same objects).
        for api_version, plural in (
            ("security.istio.io/v1beta1", "authorizationpolicies"),
            ("networking.istio.io/v1alpha3", "virtualservices"),
            ("networking.istio.io/v1beta1", "destinationrules"),
            ("gateway.networking.k8s.io/v1beta1", "httproutes"),
        ):
            got = await c.request("GET", f"/apis/{api_version}/namespaces/{ns}/{plural}/one")
            assert got["apiVersion"] == api_version
        # The status subresource is on: a status write goes through it.
        await c.patch(
            kinds.HTTP_ROUTE, "one", {"status": {"parents": []}}, ns, subresource="status"
        )
        await c.delete(kinds.NAMESPACE, ns)


def test_crds_install_and_serve_each_kind_at_its_versions(kube_cp: KubeControlPlane) -> None:
    asyncio.run(_crds(kube_cp))


# ---- workloads, services, latency ---------------------------------------------------------


async def _workloads(cp: KubeControlPlane, out: Path) -> None:
    async with controller(cp, out) as (c, mc):
        ns = await create_ns(c, AMBIENT)
        await running_pod(c, ns, "api-0", "10.244.7.10", {"app": "api"}, {"web": 8080})
        await running_pod(
            c,
            ns,
            "api-1",
            "10.244.7.11",
            {"app": "api", "istio.io/dataplane-mode": "none"},
            {"web": 8081},
        )
        svc = await c.create(
            kinds.SERVICE,
            {
                "metadata": {"name": "api"},
                "spec": {
                    "selector": {"app": "api"},
                    "ports": [{"name": "http", "port": 80, "targetPort": "web"}],
                },
            },
            ns,
        )
        vip = svc["spec"]["clusterIP"]
        hostname = f"api.{ns}.svc.cluster.local"

        def ready() -> MeshState | None:
            s = file_state(out)
            if s is None or s.service_by_hostname(hostname) is None:
                return None
            if sha256(out.read_bytes()).hexdigest() != mc.digest:
                return None  # the file is written before the controller publishes it
            return s if len([w for w in s.workloads if w.namespace == ns]) == 2 else None

        state = await until(ready, what="workloads and service in the file and pushed")
        api = state.service_by_hostname(hostname)
        assert [str(v) for v in api.vips] == [f"/{vip}"]
        w0 = state.workload_by_uid(f"Kubernetes//Pod/{ns}/api-0")
        w1 = state.workload_by_uid(f"Kubernetes//Pod/{ns}/api-1")
        assert w0.protocol is TunnelProtocol.HBONE and w1.protocol is TunnelProtocol.NONE
        assert w0.node == NODE and str(w0.ips[0]) == "10.244.7.10"
        assert dict(w0.services)[f"{ns}/{hostname}"] == ((80, 8080),)
        assert dict(w1.services)[f"{ns}/{hostname}"] == ((80, 8081),)
        assert mc.state is not None

        # A namespace label change reaches the file: measure how fast (reported, not asserted).
        seen: list[float] = []
        mc.on_state(lambda s: seen.append(time.perf_counter()))
        seen.clear()
        t0 = time.perf_counter()
        await c.patch(
            kinds.NAMESPACE, ns, {"metadata": {"labels": {"istio.io/dataplane-mode": None}}}
        )

        def tcp_now() -> bool:
            s = file_state(out)
            w = s.workload_by_uid(f"Kubernetes//Pod/{ns}/api-0") if s else None
            return w is not None and w.protocol is TunnelProtocol.NONE

        await until(tcp_now, within=5, what="namespace label change in the file")
        latency = time.perf_counter() - t0
        print(f"namespace label -> new mesh config in {latency * 1000:.0f} ms")
        # The listeners are told once the file is written (its write is awaited on a
        # thread), so a poll can see the file first.
        await until(lambda: seen, within=5, what="the registered listener got the new state")
        await c.delete(kinds.NAMESPACE, ns)


def test_pods_services_and_labels_become_the_mesh_config(
    kube_cp: KubeControlPlane, tmp_path: Path
) -> None:
    asyncio.run(_workloads(kube_cp, tmp_path / "xds.json"))


# ---- waypoints -----------------------------------------------------------------------------


async def _waypoint(cp: KubeControlPlane, out: Path) -> None:
    async with controller(cp, out) as (c, _):
        ns = await create_ns(c, {**AMBIENT, "istio.io/use-waypoint": "waypoint"})
        await running_pod(c, ns, "api-0", "10.244.8.10", {"app": "api"})
        await c.create(
            kinds.SERVICE,
            {
                "metadata": {"name": "api"},
                "spec": {"selector": {"app": "api"}, "ports": [{"name": "http", "port": 80}]},
            },
            ns,
        )
        gw = await c.create(kinds.GATEWAY, waypoint_gateway(ns), ns)

        async def owned() -> Any:
            try:
                objs = [
                    await c.get(k, "waypoint", ns)
                    for k in (kinds.SERVICE_ACCOUNT, kinds.DEPLOYMENT, kinds.SERVICE)
                ]
            except KubeApiError:
                return None
            return objs

        sa, dep, svc = await until_async(owned, what="the waypoint's objects")
        for obj in (sa, dep, svc):
            (ref,) = obj["metadata"]["ownerReferences"]
            assert (ref["kind"], ref["name"], ref["uid"]) == (
                "Gateway",
                "waypoint",
                gw["metadata"]["uid"],
            )
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["python", "-m", "waypoint"]
        env = {e["name"] for e in container["env"]}
        assert {
            "WAYPOINT_NAME",
            "POD_NAMESPACE",
            "NODE_NAME",
            "POD_IP",
            "LOCAL_XDS_PATH",
            "CA_ADDRESS",
            "CA_TOKEN_PATH",
        } <= env
        assert dep["spec"]["replicas"] == 1
        assert {p["port"] for p in svc["spec"]["ports"]} == {15008, 15021}
        vip = svc["spec"]["clusterIP"]

        async def gw_status(programmed: str) -> Any:
            got = await c.get(kinds.GATEWAY, "waypoint", ns)
            status = got.get("status") or {}
            cond = {x["type"]: x["status"] for x in status.get("conditions") or ()}
            return status if cond.get("Programmed") == programmed else None

        status = await until_async(lambda: gw_status("False"), what="Gateway status")
        assert status["addresses"][0] == {"type": "IPAddress", "value": vip}

        # The service is bound to the waypoint by the namespace label, by its ClusterIP.
        def bound() -> bool:
            s = file_state(out)
            api = s.service_by_hostname(f"api.{ns}.svc.cluster.local") if s else None
            return bool(api and api.waypoint and str(api.waypoint.address) == f"/{vip}")

        await until(bound, what="service bound to the waypoint")

        # Play the kubelet for the Deployment's pod: Programmed once a replica is ready.
        async def waypoint_pod() -> Any:
            pods = await c.list(
                kinds.POD, ns, label_selector="gateway.networking.k8s.io/gateway-name=waypoint"
            )
            return pods["items"]

        (pod,) = await until_async(waypoint_pod, what="the Deployment's pod")
        assert pod["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
        await kubelet_ready(c, ns, pod["metadata"]["name"], "10.244.8.99")
        await until_async(lambda: gw_status("True"), within=30, what="Programmed")

        # Deleting the Gateway removes what it owned (the garbage collector).
        await c.delete(kinds.GATEWAY, "waypoint", ns)

        async def gone() -> bool:
            for k in (kinds.SERVICE_ACCOUNT, kinds.DEPLOYMENT, kinds.SERVICE):
                try:
                    await c.get(k, "waypoint", ns)
                    return False
                except KubeApiError as e:
                    if e.status != 404:
                        raise
            return True

        # The controller-manager's garbage collector removes them; on a loaded machine, with
        # a session's worth of objects in its graph, that has taken over 30 s.
        await until_async(gone, within=90, what="owned objects collected")
        await c.delete(kinds.NAMESPACE, ns)


def test_a_waypoint_gateway_gets_its_objects_address_and_programmed(
    kube_cp: KubeControlPlane, tmp_path: Path
) -> None:
    asyncio.run(_waypoint(kube_cp, tmp_path / "xds.json"))


# ---- statuses and a bad policy -------------------------------------------------------------


async def _routes_and_bad_policy(cp: KubeControlPlane, out: Path) -> None:
    async with controller(cp, out) as (c, _):
        ns = await create_ns(c, AMBIENT)
        await running_pod(c, ns, "api-0", "10.244.9.10", {"app": "api"})
        await c.create(
            kinds.SERVICE,
            {
                "metadata": {"name": "api"},
                "spec": {"selector": {"app": "api"}, "ports": [{"name": "http", "port": 80}]},
            },
            ns,
        )
        await c.create(kinds.HTTP_ROUTE, http_route(ns, "good", "api", "api"), ns)
        await c.create(kinds.HTTP_ROUTE, http_route(ns, "orphan", "nothere", "api"), ns)
        bad = authorization_policy(
            ns,
            "broken",
            {
                "selector": {"matchLabels": {"app": "api"}},
                "action": "ALLOW",
                "rules": [{"from": [{"source": {"principals": 7}}]}],
            },
        )
        await c.create(kinds.AUTHORIZATION_POLICY, bad, ns)

        async def parents(name: str) -> Any:
            """The route's computed parent statuses (not the "not computed yet" ones a
            route may get first, before the controller has seen its parent)."""
            got = await c.get(kinds.HTTP_ROUTE, name, ns)
            found = ((got.get("status") or {}).get("parents")) or None
            pending = any(
                x.get("reason") == "Pending" for p in found or () for x in p["conditions"]
            )
            return None if pending else found

        (good,) = await until_async(lambda: parents("good"), what="route status")
        cond = {x["type"]: (x["status"], x["reason"]) for x in good["conditions"]}
        assert cond == {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")}
        assert good["parentRef"]["name"] == "api"
        (orphan,) = await until_async(lambda: parents("orphan"), what="route status")
        cond = {x["type"]: (x["status"], x["reason"]) for x in orphan["conditions"]}
        assert cond["Accepted"] == ("False", "NoMatchingParent")

        # The bad policy: reported on its status and by an Event, and enforced as deny-all.
        async def policy_condition() -> Any:
            got = await c.get(kinds.AUTHORIZATION_POLICY, "broken", ns)
            conds = (got.get("status") or {}).get("conditions") or ()
            return next((x for x in conds if x["type"] == "Accepted"), None)

        accepted = await until_async(policy_condition, what="policy status")
        assert accepted["status"] == "False" and "principals" in accepted["message"]
        events = await c.list(kinds.EVENT, ns)
        assert any(e["involvedObject"]["name"] == "broken" for e in events["items"])

        def with_policy() -> MeshState | None:
            s = file_state(out)
            return s if s and f"{ns}/broken" in {p.key for p in s.policies} else None

        state = await until(with_policy, what="policy in the mesh config")
        w = state.workload_by_uid(f"Kubernetes//Pod/{ns}/api-0")
        verdict = authorize(
            PolicyIndex.build(state),
            w,
            None,
            ipaddress.ip_address("10.244.9.77"),
            SocketAddr(ipaddress.ip_address("10.244.9.10"), 80),
        )
        assert not verdict.allowed

        # Statuses are written only when they change: a quiet round writes nothing.
        before = (await c.get(kinds.HTTP_ROUTE, "good", ns))["metadata"]["resourceVersion"]
        await c.patch(kinds.NAMESPACE, ns, {"metadata": {"annotations": {"touch": "1"}}})
        await asyncio.sleep(0.5)
        after = (await c.get(kinds.HTTP_ROUTE, "good", ns))["metadata"]["resourceVersion"]
        assert before == after
        await c.delete(kinds.NAMESPACE, ns)


def test_route_parent_conditions_and_a_bad_policy_fails_closed(
    kube_cp: KubeControlPlane, tmp_path: Path
) -> None:
    asyncio.run(_routes_and_bad_policy(kube_cp, tmp_path / "xds.json"))


async def _status_of_a_late_object(cp: KubeControlPlane, out: Path) -> None:
    """A policy that reaches the informers while a round is under way is not judged by that
    round: the round computed its problems without it, so it would call it Accepted."""
    async with KubeClient(load_kubeconfig(cp.kubeconfig)) as c:
        await install_crds(c)
        mc = MeshController(c, ControllerOptions(mesh_out=out, manage_waypoints=False))
        for inf in (*mc.informers.values(), mc.deployments):  # informers only: rounds by hand
            inf.start()
        try:
            await asyncio.gather(*(i.synced.wait() for i in mc.informers.values()))
            ns = await create_ns(c, AMBIENT)
            before = mc.inputs()  # the round's snapshot, taken before the policy exists
            bad = authorization_policy(
                ns,
                "late",
                {"action": "ALLOW", "rules": [{"from": [{"source": {"principals": 7}}]}]},
            )
            await c.create(kinds.AUTHORIZATION_POLICY, bad, ns)
            cache = mc.informers["authorization_policies"]
            await until(lambda: any(o["metadata"]["name"] == "late" for o in cache.items()))
            mc.inputs = lambda: before  # type: ignore[method-assign]
            await mc.sync_once()
            got = await c.get(kinds.AUTHORIZATION_POLICY, "late", ns)
            assert not (got.get("status") or {}).get("conditions"), got.get("status")

            del mc.inputs  # the next round sees it, and reports it broken
            await mc.sync_once()
            got = await c.get(kinds.AUTHORIZATION_POLICY, "late", ns)
            (accepted,) = [x for x in got["status"]["conditions"] if x["type"] == "Accepted"]
            assert accepted["status"] == "False" and "principals" in accepted["message"]
            await c.delete(kinds.NAMESPACE, ns)
        finally:
            for inf in (*mc.informers.values(), mc.deployments):
                await inf.stop()


def test_an_object_that_arrives_during_a_round_is_judged_by_the_next(
    kube_cp: KubeControlPlane, tmp_path: Path
) -> None:
    asyncio.run(_status_of_a_late_object(kube_cp, tmp_path / "xds.json"))


# ---- the program ----------------------------------------------------------------------------


def test_python_m_controlplane_writes_the_mesh_config_and_stops_on_sigterm(
    kube_cp: KubeControlPlane, tmp_path: Path
) -> None:
    out = tmp_path / "xds.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane",
            "--kubeconfig",
            str(kube_cp.kubeconfig),
            "--mesh-out",
            str(out),
            "--no-waypoints",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        ns = "cp-" + secrets.token_hex(3)

        async def scenario() -> None:
            async with KubeClient(load_kubeconfig(kube_cp.kubeconfig)) as c:
                await c.create(kinds.NAMESPACE, {"metadata": {"name": ns, "labels": AMBIENT}})
                await ensure_node(c)
                await running_pod(c, ns, "solo-0", "10.244.10.10", {"app": "solo"})

                def has_pod() -> bool:
                    s = file_state(out)
                    return bool(s and s.workload_by_uid(f"Kubernetes//Pod/{ns}/solo-0"))

                await until(has_pod, within=30, what="the program's mesh config")
                await c.delete(kinds.NAMESPACE, ns)

        asyncio.run(scenario())
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert '"event": "mesh pushed"' in output and '"workloads"' in output


# ---- least privilege ------------------------------------------------------------------------

CLUSTER_ROLE = Kind("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", False)
CLUSTER_ROLE_BINDING = Kind(
    "rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", False
)
SECRET = Kind("", "v1", "Secret", "secrets")


async def service_account_token(c: KubeClient, ns: str, name: str) -> str:
    """The token the controller-manager issues for a ServiceAccount (v1.20 makes a Secret)."""
    await c.create(kinds.SERVICE_ACCOUNT, {"metadata": {"name": name}}, ns)

    async def token() -> str | None:
        sa = await c.get(kinds.SERVICE_ACCOUNT, name, ns)
        for ref in sa.get("secrets") or ():
            secret = await c.get(SECRET, ref["name"], ns)
            data = (secret.get("data") or {}).get("token")
            if data:
                return base64.b64decode(data).decode()
        return None

    found: str = await until_async(token, what="the service account's token")
    return found


async def _least_privilege(cp: KubeControlPlane, out: Path) -> None:
    admin_config = load_kubeconfig(cp.kubeconfig)
    async with KubeClient(admin_config) as admin:
        home = await create_ns(admin, {})
        name = "cp-" + secrets.token_hex(3)
        token = await service_account_token(admin, home, name)
        role = cluster_role()
        role["metadata"]["name"] = name
        await admin.create(CLUSTER_ROLE, role)
        await admin.create(
            CLUSTER_ROLE_BINDING,
            {
                "metadata": {"name": name},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": name,
                },
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": home}],
            },
        )
        await ensure_node(admin)
        try:
            async with KubeClient(dataclasses.replace(admin_config, token=token)) as c:
                # Least privilege indeed: it may not read Secrets.
                with pytest.raises(KubeApiError) as denied:
                    await c.list(SECRET, home)
                assert denied.value.status == 403
                await install_crds(c)
                mc = MeshController(c, ControllerOptions(mesh_out=out))
                await mc.start()
                try:
                    ns = await create_ns(admin, AMBIENT)
                    await running_pod(admin, ns, "api-0", "10.244.11.10", {"app": "api"})
                    await admin.create(kinds.HTTP_ROUTE, http_route(ns, "r", "api", "api"), ns)
                    await admin.create(
                        kinds.SERVICE,
                        {
                            "metadata": {"name": "api"},
                            "spec": {"selector": {"app": "api"}, "ports": [{"port": 80}]},
                        },
                        ns,
                    )
                    await admin.create(kinds.GATEWAY, waypoint_gateway(ns), ns)

                    async def done() -> bool:
                        gw = await admin.get(kinds.GATEWAY, "waypoint", ns)
                        route = await admin.get(kinds.HTTP_ROUTE, "r", ns)
                        try:
                            await admin.get(kinds.DEPLOYMENT, "waypoint", ns)
                        except KubeApiError:
                            return False
                        return bool(
                            gw.get("status", {}).get("addresses")
                            and route.get("status", {}).get("parents")
                        )

                    await until_async(done, what="objects and statuses written with the role")
                    s = file_state(out)
                    assert s is not None and s.workload_by_uid(f"Kubernetes//Pod/{ns}/api-0")
                    await admin.delete(kinds.NAMESPACE, ns)
                finally:
                    await mc.stop()
        finally:
            await admin.delete(CLUSTER_ROLE_BINDING, name)
            await admin.delete(CLUSTER_ROLE, name)
            await admin.delete(kinds.NAMESPACE, home)


def test_the_control_plane_needs_only_its_cluster_role(
    kube_cp: KubeControlPlane, tmp_path: Path
) -> None:
    asyncio.run(_least_privilege(kube_cp, tmp_path / "xds.json"))
