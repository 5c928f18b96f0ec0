"""What the local kubelet will run for a Pod object: read once from the API's JSON (pure).

Only the first container runs (init containers and sidecars are not supported: the pod's
status says so). An image found in the local image store (`localcluster.kube.images`) runs
from its filesystem: the caller passes its bundle and the plan carries a
`containerplan.ContainerPlan`. Any other image is recorded, never pulled ("project mode"):
`command` + `args` are run as they are, with a leading `python`/`python3` meaning the
project's own interpreter, so a manifest works without a container runtime; a container
without a command then cannot run and is reported as `CreateContainerError`.

The environment is Kubernetes': the service variables of the pod's namespace (plus the
`kubernetes` service of `default`), then the container's `env` (`value` with `$(VAR)`
expansion, `valueFrom.fieldRef` for the pod's own fields, `configMapKeyRef`/`secretKeyRef`
resolved by the kubelet before the start); `command` and `args` are expanded against it as
the kubelet does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from localcluster.kube.containerplan import Bundle, ContainerPlan, PodPlanError, plan_container

__all__ = ["PodPlanError"]

PYTHON_WORDS = frozenset({"python", "python3"})
DEFAULT_GRACE_S = 30.0
# The fieldRef paths a container's env may name (the kubelet's downward API, less labels
# and annotations, which need a file mount).
FIELD_PATHS = frozenset(
    {
        "metadata.name",
        "metadata.namespace",
        "metadata.uid",
        "spec.nodeName",
        "spec.serviceAccountName",
        "status.podIP",
        "status.hostIP",
    }
)
RESTART_POLICIES = frozenset({"Always", "OnFailure", "Never"})


@dataclass(frozen=True, slots=True)
class Probe:
    """A readinessProbe: an HTTP GET (2xx/3xx passes) or a TCP connect, from the node."""

    kind: str  # "httpGet" | "tcpSocket"
    port: int
    path: str = "/"
    host: str = ""  # empty: the pod's IP
    initial_delay_s: float = 0.0
    period_s: float = 10.0
    timeout_s: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One entry of a container's `env`: a literal, a fieldRef (`field`), or a key of a
    ConfigMap or Secret (`ref`: kind "configMap"/"secret", name, key; `optional`)."""

    name: str
    value: str = ""
    field: str = ""
    ref: tuple[str, str, str] | None = None
    optional: bool = False


@dataclass(frozen=True, slots=True)
class EnvFrom:
    """One entry of a container's `envFrom`: every key of a ConfigMap or Secret."""

    kind: str  # "configMap" | "secret"
    name: str
    prefix: str = ""
    optional: bool = False


@dataclass(frozen=True, slots=True)
class PodPlan:
    uid: str
    namespace: str
    name: str
    node: str
    host_network: bool
    container: str
    image: str
    command: tuple[str, ...]  # command + args, not yet expanded
    env: tuple[EnvVar, ...]
    working_dir: str
    restart_policy: str
    grace_s: float
    service_account: str
    readiness: Probe | None
    problem: str = ""  # set: the pod cannot run, and this says why
    image_plan: ContainerPlan | None = None  # set: runs from the local image store
    env_from: tuple[EnvFrom, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePortInfo:
    name: str
    port: int
    target_port: int | str  # a number, or the name of a container port
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """What the kubelet and the service proxy need of a Service."""

    namespace: str
    name: str
    cluster_ip: str  # "" or "None" when headless
    selector: tuple[tuple[str, str], ...]
    ports: tuple[ServicePortInfo, ...]

    @property
    def has_vip(self) -> bool:
        return self.cluster_ip not in ("", "None")


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def plan_pod(pod: Mapping[str, Any], bundle: Bundle | None = None, image_id: str = "") -> PodPlan:
    """The plan for a Pod object (`bundle`: its image, found in the local store); a pod that
    cannot run gets a plan with `problem` set (never an exception: the kubelet must report
    it on the pod, not stop)."""
    md = _dict(pod.get("metadata"))
    spec = _dict(pod.get("spec"))
    containers = _list(spec.get("containers"))
    first = _dict(containers[0]) if containers else {}
    grace = spec.get("terminationGracePeriodSeconds")
    base = PodPlan(
        uid=str(md.get("uid", "")),
        namespace=str(md.get("namespace", "default")),
        name=str(md.get("name", "")),
        node=str(spec.get("nodeName", "")),
        host_network=bool(spec.get("hostNetwork", False)),
        container=str(first.get("name", "")),
        image=str(first.get("image", "")),
        command=(),
        env=(),
        working_dir=str(first.get("workingDir", "")),
        restart_policy=str(spec.get("restartPolicy", "Always")),
        grace_s=float(grace) if isinstance(grace, int | float) and grace >= 0 else DEFAULT_GRACE_S,
        service_account=str(spec.get("serviceAccountName") or "default"),
        readiness=None,
    )
    try:
        if not containers:
            raise PodPlanError("spec.containers is empty")
        if len(containers) > 1 or _list(spec.get("initContainers")):
            raise PodPlanError(
                "only one container per pod is supported by the local kubelet "
                f"(got {len(containers)} and {len(_list(spec.get('initContainers')))} init)"
            )
        if base.restart_policy not in RESTART_POLICIES:
            raise PodPlanError(
                f"spec.restartPolicy {base.restart_policy!r} is not one of Always, OnFailure, Never"
            )
        command = [str(c) for c in _list(first.get("command"))]
        args = [str(a) for a in _list(first.get("args"))]
        image_plan = plan_container(pod, first, bundle, image_id) if bundle is not None else None
        if not command and image_plan is None:
            raise PodPlanError(
                f"container {base.container!r} has no command and its image {base.image!r} "
                "is not in the local image store: images are not pulled, so there is no "
                "entrypoint to fall back on"
            )
        ports = _container_ports(first)
        return PodPlan(
            **{
                **_fields(base),
                "command": (*command, *args),
                "env": _env(first),
                "env_from": _env_from(first),
                "readiness": _probe(first.get("readinessProbe"), ports),
                "image_plan": image_plan,
            }
        )
    except PodPlanError as e:
        return PodPlan(**{**_fields(base), "problem": str(e)})


def _fields(p: PodPlan) -> dict[str, Any]:
    return {name: getattr(p, name) for name in PodPlan.__slots__}


def _container_ports(c: Mapping[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in _list(c.get("ports")):
        p = _dict(p)
        if isinstance(p.get("name"), str) and isinstance(p.get("containerPort"), int):
            out[p["name"]] = p["containerPort"]
    return out


def _env(c: Mapping[str, Any]) -> tuple[EnvVar, ...]:
    out: list[EnvVar] = []
    for i, e in enumerate(_list(c.get("env"))):
        e = _dict(e)
        name = str(e.get("name", ""))
        if e.get("valueFrom") is None:
            out.append(EnvVar(name, value=str(e.get("value", ""))))
            continue
        value_from = _dict(e.get("valueFrom"))
        key_ref = next(
            (
                (kind, _dict(value_from[key]))
                for kind, key in (("configMap", "configMapKeyRef"), ("secret", "secretKeyRef"))
                if key in value_from
            ),
            None,
        )
        if key_ref is not None:
            kind, kr = key_ref
            ref = (kind, str(kr.get("name", "")), str(kr.get("key", "")))
            out.append(EnvVar(name, ref=ref, optional=bool(kr.get("optional", False))))
            continue
        path = str(_dict(value_from.get("fieldRef")).get("fieldPath", ""))
        if path not in FIELD_PATHS:
            raise PodPlanError(
                f"env[{i}] ({name}): valueFrom supports configMapKeyRef, secretKeyRef and "
                f"fieldRef to {', '.join(sorted(FIELD_PATHS))}; got {e.get('valueFrom')!r}"
            )
        out.append(EnvVar(name, field=path))
    return tuple(out)


def _env_from(c: Mapping[str, Any]) -> tuple[EnvFrom, ...]:
    out: list[EnvFrom] = []
    for i, e in enumerate(_list(c.get("envFrom"))):
        e = _dict(e)
        for kind, key in (("configMap", "configMapRef"), ("secret", "secretRef")):
            if key in e:
                ref = _dict(e[key])
                out.append(
                    EnvFrom(
                        kind,
                        str(ref.get("name", "")),
                        str(e.get("prefix", "")),
                        bool(ref.get("optional", False)),
                    )
                )
                break
        else:
            raise PodPlanError(f"envFrom[{i}]: only configMapRef and secretRef are supported")
    return tuple(out)


_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


def env_from_vars(
    env_from: Sequence[EnvFrom], objects: Mapping[tuple[str, str], Mapping[str, str] | None]
) -> dict[str, str]:
    """The variables `envFrom` gives, in order (a later source wins), from the objects read
    (None: not found). A key that is not a valid variable name is skipped, as the kubelet
    does; a required object that is missing raises PodPlanError."""
    out: dict[str, str] = {}
    for ef in env_from:
        data = objects.get((ef.kind, ef.name))
        if data is None:
            if ef.optional:
                continue
            raise PodPlanError(f"envFrom: {ef.kind} {ef.name!r} not found")
        for key, value in data.items():
            if _ENV_NAME.match(ef.prefix + key):
                out[ef.prefix + key] = value
    return out


def _probe(v: Any, ports: Mapping[str, int]) -> Probe | None:
    if v is None:
        return None
    p = _dict(v)
    if "httpGet" in p:
        kind, action = "httpGet", _dict(p["httpGet"])
        if str(action.get("scheme", "HTTP")).upper() != "HTTP":
            raise PodPlanError("readinessProbe.httpGet: only scheme HTTP is supported")
    elif "tcpSocket" in p:
        kind, action = "tcpSocket", _dict(p["tcpSocket"])
    else:
        raise PodPlanError("readinessProbe: only httpGet and tcpSocket are supported")
    port = action.get("port")
    if isinstance(port, str) and not port.isdigit():
        if port not in ports:
            raise PodPlanError(f"readinessProbe.{kind}.port: no container port named {port!r}")
        port = ports[port]
    try:
        number = int(port)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PodPlanError(f"readinessProbe.{kind}.port: {port!r} is not a port") from None
    if not 0 < number < 65536:
        raise PodPlanError(f"readinessProbe.{kind}.port: {number} is out of range")

    def num(key: str, default: float, least: float) -> float:
        value = p.get(key, default)
        return max(float(value), least) if isinstance(value, int | float) else default

    return Probe(
        kind=kind,
        port=number,
        path=str(action.get("path", "/")) or "/",
        host=str(action.get("host", "")),
        initial_delay_s=num("initialDelaySeconds", 0.0, 0.0),
        period_s=num("periodSeconds", 10.0, 1.0),
        timeout_s=num("timeoutSeconds", 1.0, 1.0),
        success_threshold=int(num("successThreshold", 1, 1)),
        failure_threshold=int(num("failureThreshold", 3, 1)),
    )


# --- services and the environment (pure) ----------------------------------------------------


def service_info(svc: Mapping[str, Any]) -> ServiceInfo:
    md = _dict(svc.get("metadata"))
    spec = _dict(svc.get("spec"))
    ports: list[ServicePortInfo] = []
    for p in _list(spec.get("ports")):
        p = _dict(p)
        port = p.get("port")
        if not isinstance(port, int):
            continue
        target = p.get("targetPort", port)
        ports.append(
            ServicePortInfo(
                name=str(p.get("name", "")),
                port=port,
                target_port=target if isinstance(target, int | str) else port,
                protocol=str(p.get("protocol", "TCP")),
            )
        )
    selector = _dict(spec.get("selector"))
    return ServiceInfo(
        namespace=str(md.get("namespace", "default")),
        name=str(md.get("name", "")),
        cluster_ip=str(spec.get("clusterIP", "")),
        selector=tuple(sorted((str(k), str(v)) for k, v in selector.items())),
        ports=tuple(ports),
    )


def env_prefix(service_name: str) -> str:
    return service_name.upper().replace("-", "_")


def service_env(services: Sequence[ServiceInfo], namespace: str) -> dict[str, str]:
    """The variables the kubelet sets for the services of a pod's namespace (and for
    `default/kubernetes`, which every pod gets): `_SERVICE_HOST`/`_SERVICE_PORT` and the
    Docker-link style `_PORT_<n>_TCP...` ones."""
    env: dict[str, str] = {}
    for s in sorted(services, key=lambda s: (s.namespace, s.name)):
        wanted = s.namespace == namespace or (s.namespace == "default" and s.name == "kubernetes")
        if not wanted or not s.has_vip or not s.ports:
            continue
        p = env_prefix(s.name)
        env[f"{p}_SERVICE_HOST"] = s.cluster_ip
        env[f"{p}_SERVICE_PORT"] = str(s.ports[0].port)
        for port in s.ports:
            if port.name:
                env[f"{p}_SERVICE_PORT_{env_prefix(port.name)}"] = str(port.port)
        first = s.ports[0]
        env[f"{p}_PORT"] = f"{first.protocol.lower()}://{s.cluster_ip}:{first.port}"
        for port in s.ports:
            link = f"{p}_PORT_{port.port}_{port.protocol.upper()}"
            env[link] = f"{port.protocol.lower()}://{s.cluster_ip}:{port.port}"
            env[f"{link}_PROTO"] = port.protocol.lower()
            env[f"{link}_PORT"] = str(port.port)
            env[f"{link}_ADDR"] = s.cluster_ip
    return env


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: a defined variable is replaced, an undefined one left
    as written, `$$` is a literal `$`."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _REF.sub(sub, text)


def field_values(plan: PodPlan, pod_ip: str, host_ip: str) -> dict[str, str]:
    return {
        "metadata.name": plan.name,
        "metadata.namespace": plan.namespace,
        "metadata.uid": plan.uid,
        "spec.nodeName": plan.node,
        "spec.serviceAccountName": plan.service_account,
        "status.podIP": pod_ip,
        "status.hostIP": host_ip,
    }


def container_env(
    plan: PodPlan,
    services: Sequence[ServiceInfo],
    pod_ip: str,
    host_ip: str,
    refs: Mapping[tuple[str, str, str], str] | None = None,
    from_vars: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Service variables, then `envFrom`'s (`from_vars`, see `env_from_vars`), then the
    container's own `env` in order (each may refer to the ones before it); the later win on
    a conflict. `refs`: the values of the ConfigMap/Secret keys the env names (an optional
    one missing is left unset)."""
    env = service_env(services, plan.namespace)
    env.update(from_vars or {})
    fields = field_values(plan, pod_ip, host_ip)
    for var in plan.env:
        if var.ref is not None:
            value = (refs or {}).get(var.ref)
            if value is not None:
                env[var.name] = value
        else:
            env[var.name] = fields[var.field] if var.field else expand(var.value, env)
    return env


def env_refs(plan: PodPlan) -> list[tuple[tuple[str, str, str], bool]]:
    """The ConfigMap/Secret keys the container's env names, each with whether it is optional."""
    return [(v.ref, v.optional) for v in plan.env if v.ref is not None]


def container_argv(plan: PodPlan, env: Mapping[str, str], python: str) -> list[str]:
    """command + args expanded against the environment; a leading `python`/`python3` is
    the project's interpreter (`python`)."""
    argv = [expand(a, env) for a in plan.command]
    if argv and argv[0] in PYTHON_WORDS:
        argv[0] = python
    return argv
