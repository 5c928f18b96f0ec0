"""What a tunnel's routing decision for a new connection to a service costs as the service
grows: `ztunnel.proxy.outbound.decide` for a connection to a service VIP whose service has N
pods (healthy, HBONE), N in --sizes. No root, no cluster: the pure decision on a real
`MeshState`, as the client tunnel makes it for every connection it accepts.

Printed per size: microseconds per decision (median over --rounds of the mean over --calls),
the first decision on a fresh snapshot (it lists the service's ready endpoints, once per
snapshot), and the ratio of the largest size over the smallest (O(1) per connection gives
about 1). No timing is asserted; compare ratios from one run.

    .venv/bin/python benchmarks/service_scale.py
    .venv/bin/python benchmarks/service_scale.py --sizes 1,100,10000 --rounds 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from meshcore.sockets import SocketAddr  # noqa: E402
from meshcore.state import MeshState, Workload  # noqa: E402
from tests.support.mesh import ips, mesh_state, ports, serves, service, vips, workload  # noqa: E402
from ztunnel.proxy.outbound import Route, decide  # noqa: E402

VIP = "10.96.1.10"


def state_with(pods: int) -> tuple[MeshState, Workload]:
    """A service `web` (port 80 -> 8080) with `pods` healthy HBONE pods, and a client pod."""
    web = service(name="web", namespace="shop", vips=vips(VIP), ports=ports({80: 8080}))
    client = workload(
        name="client", namespace="shop", service_account="client", ips=ips("10.2.0.1")
    )
    backends = [
        workload(
            name=f"web-{i}",
            namespace="shop",
            service_account="web",
            ips=ips(f"10.{1 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"),
            services=serves((web, {})),
        )
        for i in range(pods)
    ]
    return mesh_state([client, *backends], [web]), client


def measure(pods: int, calls: int, rounds: int) -> dict[str, Any]:
    state, client = state_with(pods)
    dst = SocketAddr.of((VIP, 80))
    t0 = time.perf_counter()
    first = decide(state, client, dst)
    first_us = (time.perf_counter() - t0) * 1e6
    if first.route is not Route.HBONE:
        raise SystemExit(f"unexpected decision for {pods} pods: {first}")
    per_round = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            decide(state, client, dst)
        per_round.append((time.perf_counter() - t) / calls * 1e6)
    return {"pods": pods, "first_us": first_us, "us_per_decision": statistics.median(per_round)}


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--sizes", default="1,10,100,1000,10000", help="pods behind the service")
    ap.add_argument("--calls", type=int, default=2000, help="decisions per round")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",") if s]
    if not sizes or min(sizes) < 1 or max(sizes) > 100_000:
        ap.error("--sizes: pod counts 1..100000")
    if not 1 <= a.calls <= 1_000_000 or not 1 <= a.rounds <= 100:
        ap.error("--calls 1..1000000, --rounds 1..100")
    rows = [measure(n, a.calls, a.rounds) for n in sizes]
    print(f"{'pods':>8} {'us/decision':>12} {'first us':>10}")
    for r in rows:
        print(f"{r['pods']:>8,} {r['us_per_decision']:>12.2f} {r['first_us']:>10.1f}")
    ratio = rows[-1]["us_per_decision"] / rows[0]["us_per_decision"]
    print(f"ratio {rows[-1]['pods']} pods over {rows[0]['pods']}: {ratio:.2f}")
    print(json.dumps({"rows": rows, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
