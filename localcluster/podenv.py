"""What a local cluster's pod sees of its cluster, as a kubelet would give it (pure).

One answer for both the pod's app (started at `up`) and `ambientctl exec`, so a command run
by hand sees what the app sees:
- the environment: the pod's own variables (HOSTNAME, POD_NAME, POD_NAMESPACE, POD_IP, NODE_NAME,
  SERVICE_ACCOUNT), the Kubernetes service variables of its namespace exactly as the
  kubelet writes them (`<SVC>_SERVICE_HOST`, `<SVC>_SERVICE_PORT[_<NAME>]`, `<SVC>_PORT`,
  `<SVC>_PORT_<n>_TCP[_PROTO|_PORT|_ADDR]`; the same function the local kubelet uses), then
  the cluster file's `env` for the pod, which wins on conflict;
- the resolver, when the cluster captures DNS: a resolv.conf with the namespace's search
  path (`<ns>.svc.cluster.local svc.cluster.local cluster.local`, ndots:5) and the cluster
  file's `dns.nameservers`, whose queries the node's tunnel answers or forwards. Without
  DNS capture a local cluster has no cluster resolver, and the pod keeps the machine's.
"""

from __future__ import annotations

from localcluster.kube.hostnet import NDOTS, cluster_searches, resolv_conf
from localcluster.kube.podplan import ServiceInfo, ServicePortInfo, service_env
from localcluster.spec import ClusterSpec, PodSpec, ServiceSpec
from meshcore.identity.spiffe import SpiffeId


def service_info(svc: ServiceSpec) -> ServiceInfo:
    """A cluster file's Service as the kubelet's env function reads a Service object."""
    return ServiceInfo(
        namespace=svc.namespace,
        name=svc.name,
        cluster_ip=str(svc.vip),
        selector=tuple(sorted(svc.selector.items())),
        ports=tuple(ServicePortInfo(p.name, p.port, p.target_port) for p in svc.ports),
    )


def pod_env(spec: ClusterSpec, pod: PodSpec) -> dict[str, str]:
    """The variables a pod's processes get (see the module doc); the pod's `env` wins."""
    env = service_env([service_info(s) for s in spec.all_services()], pod.namespace)
    env.update(
        HOSTNAME=pod.name,  # as the container runtime sets it
        POD_NAME=pod.name,
        POD_NAMESPACE=pod.namespace,
        POD_IP=str(pod.ip),
        NODE_NAME=pod.node,
        SERVICE_ACCOUNT=pod.service_account,
    )
    env.update(pod.env)
    return env


def pod_resolv_conf(spec: ClusterSpec, pod: PodSpec) -> str | None:
    """The pod's /etc/resolv.conf, or None when the cluster does not capture DNS."""
    if not spec.dns.capture or not spec.dns.nameservers:
        return None
    return resolv_conf(
        pod.namespace,
        "None",  # exactly what dnsConfig says: the cluster's resolvers, the pod's search path
        False,
        {
            "nameservers": [str(ip) for ip in spec.dns.nameservers],
            "searches": list(cluster_searches(pod.namespace)),
            "options": [{"name": "ndots", "value": str(NDOTS)}],
        },
    )


def identity(spec: ClusterSpec, pod: PodSpec) -> str:
    """The pod's SPIFFE identity (its certificate's URI SAN when it is in the mesh)."""
    return str(SpiffeId(spec.trust_domain, pod.namespace, pod.service_account))
