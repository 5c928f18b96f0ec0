"""L4 authorization benchmark: one `PolicyIndex.evaluate()` per inbound connection.

Builds --policies AuthorizationPolicies of --rules rules each, as Istio resources, spread the
way a large mesh has them: most in other namespaces or selecting other workloads, a few
hundred in scope for the workload under test (namespace-wide, selecting its labels, or
attached by key), and some mesh-wide ones in the root namespace. Rules look like real ones:
exact principals or namespaces, sometimes a principal prefix, ports, an ipBlocks/notIpBlocks
or a `when` condition; about one policy in five is a DENY.

Measured (time.perf_counter_ns, one sample per call, a bounded number of calls):
- `PolicyIndex.build`: cold (parsing and indexing everything), median of --build-repeats,
  and a rebuild after one policy changed (parses are memoized per entry);
- the first `evaluate()` for the workload (builds its cached, indexed rule set);
- steady-state `evaluate()`: median and p99 for requests that are allowed by an ALLOW rule,
  denied by a DENY rule, denied because no ALLOW rule matches, and plaintext.

Prints a table and one JSON line. Target: under 50 us per check. Only figures from one run on
one machine compare; nothing here asserts a time. Pure CPU: no files, no network.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from ipaddress import ip_address
from typing import Any

from meshcore.defaults import ROOT_NAMESPACE
from meshcore.identity.spiffe import SpiffeId
from meshcore.policy.index import PolicyIndex, clear_parse_cache
from meshcore.policy.model import Request
from meshcore.policy.verdict import Verdict
from meshcore.state import HealthStatus, MeshState, RawPolicy, TunnelProtocol, Workload

ROOT = ROOT_NAMESPACE
TARGET_US = 50.0
NAMESPACE = "shop"
LABELS = {"app": "checkout", "version": "v1", "team": "payments"}
OTHER_APPS = ("cart", "catalog", "search", "users", "orders", "reviews", "media", "auth")


def make_workload() -> Workload:
    return Workload(
        uid="shop/checkout-0",
        name="checkout-0",
        namespace=NAMESPACE,
        service_account="checkout",
        trust_domain="cluster.local",
        ips=(ip_address("10.20.0.7"),),
        network="",
        protocol=TunnelProtocol.HBONE,
        node="node1",
        canonical_name="checkout",
        canonical_revision="v1",
        workload_name="checkout",
        workload_type="deployment",
        cluster_id="c1",
        status=HealthStatus.HEALTHY,
        waypoint=None,
        services=(),
        labels=tuple(sorted(LABELS.items())),
        authorization_policies=tuple(f"{NAMESPACE}/attached-{i}" for i in range(40)),
    )


def principal(ns: int, sa: int) -> str:
    return f"cluster.local/ns/ns-{ns}/sa/sa-{sa}"


def make_rule(rng: random.Random, deny: bool) -> dict[str, Any]:
    """One rule of a realistic shape. Identities come from ns-0..ns-199 / sa-0..sa-19;
    DENY rules name quarantine namespaces so that ordinary clients are not denied."""
    rule: dict[str, Any] = {}
    shape = rng.random()
    if deny:
        source: dict[str, Any] = {"namespaces": [f"quarantine-{rng.randrange(50)}"]}
    elif shape < 0.6:
        source = {"principals": [principal(rng.randrange(200), rng.randrange(20)) for _ in "ab"]}
    elif shape < 0.85:
        source = {"namespaces": [f"ns-{rng.randrange(200)}"]}
    elif shape < 0.95:
        source = {"principals": [f"cluster.local/ns/ns-{rng.randrange(200)}/*"]}
    else:
        source = {"ipBlocks": [f"10.{rng.randrange(256)}.0.0/16"]}
    if rng.random() < 0.2:
        source["notIpBlocks"] = ["10.255.0.0/16"]
    rule["from"] = [{"source": source}]
    if rng.random() < 0.8:
        rule["to"] = [{"operation": {"ports": [str(rng.choice((8080, 8443, 9090, 5432)))]}}]
    if rng.random() < 0.1:
        rule["when"] = [{"key": "destination.ip", "notValues": ["10.99.0.0/16"]}]
    return rule


def istio(name: str, ns: str, spec: dict[str, Any]) -> RawPolicy:
    entry = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }
    return RawPolicy.from_mapping(name, ns, entry)


def make_policies(total: int, rules: int, seed: int) -> tuple[list[RawPolicy], dict[str, int]]:
    rng = random.Random(seed)
    counts = {"global": 0, "namespace": 0, "selector": 0, "attached": 0, "elsewhere": 0}
    out: list[RawPolicy] = []

    def spec(deny: bool, selector: dict[str, str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "action": "DENY" if deny else "ALLOW",
            "rules": [make_rule(rng, deny) for _ in range(rules)],
        }
        if selector:
            body["selector"] = {"matchLabels": selector}
        return body

    # In scope for the workload: ~3% of the policies (300 of 10 000), plus 20 mesh-wide.
    in_scope = max(4, total * 3 // 100)
    n_global = min(20, max(1, total // 500))
    for i in range(n_global):
        out.append(istio(f"mesh-{i}", ROOT, spec(deny=i % 4 == 0)))
        counts["global"] += 1
    for i in range(in_scope):
        deny = i % 5 == 0
        kind = i % 3
        if kind == 0:
            out.append(istio(f"ns-wide-{i}", NAMESPACE, spec(deny)))
            counts["namespace"] += 1
        elif kind == 1:
            labels = dict(rng.sample(sorted(LABELS.items()), rng.randint(1, 2)))
            out.append(istio(f"select-{i}", NAMESPACE, spec(deny, labels)))
            counts["selector"] += 1
        elif counts["attached"] < 40:
            # Attached by the control plane (the workload lists its key), selector elsewhere.
            name = f"attached-{counts['attached']}"
            out.append(istio(name, NAMESPACE, spec(deny, {"app": "not-matching"})))
            counts["attached"] += 1
        else:
            out.append(istio(f"ns-wide-{i}", NAMESPACE, spec(deny)))
            counts["namespace"] += 1
    # The rest: other namespaces, or this namespace with selectors for other apps.
    i = 0
    while len(out) < total:
        deny = i % 5 == 0
        if i % 10 == 0:
            labels = {"app": rng.choice(OTHER_APPS)}
            out.append(istio(f"other-app-{i}", NAMESPACE, spec(deny, labels)))
        else:
            ns = f"ns-{rng.randrange(200)}"
            selector = {"app": rng.choice(OTHER_APPS)} if rng.random() < 0.7 else None
            out.append(istio(f"p-{i}", ns, spec(deny, selector)))
        counts["elsewhere"] += 1
        i += 1
    return out, counts


def find_allowed_request(index: PolicyIndex, wl: Workload) -> Request:
    """A request allowed by the last-in-order ALLOW rule that names an exact principal."""
    for policy in reversed(index.applicable(wl)):
        if policy.action.value != "ALLOW" or policy.dry_run:
            continue
        for rule in reversed(policy.rules):
            for clause in rule.clauses:
                for match in clause:
                    if match.principals and match.principals[0].kind.value == "exact":
                        td, _, ns, _, sa = match.principals[0].value.split("/")
                        port = 8080
                        for other in rule.clauses:
                            for m in other:
                                if m.destination_ports:
                                    port = m.destination_ports[0]
                        req = Request(
                            ip_address("172.16.5.5"),
                            SpiffeId(td, ns, sa),
                            ip_address("10.20.0.7"),
                            port,
                        )
                        if index.evaluate(wl, req).allowed:
                            return req
    raise SystemExit("no allowed request found: the generated policies have no usable ALLOW rule")


def time_calls(
    evaluate: Callable[[Workload, Request], Verdict], wl: Workload, req: Request, calls: int
) -> list[int]:
    samples = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        start = clock()
        evaluate(wl, req)
        samples.append(clock() - start)
    return samples


def summary(samples: list[int]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {
        "median_us": statistics.median(ordered) / 1000,
        "p99_us": p99 / 1000,
        "mean_us": statistics.fmean(ordered) / 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", type=int, default=10_000)
    parser.add_argument("--rules", type=int, default=10)
    parser.add_argument("--calls", type=int, default=20_000, help="timed calls per request kind")
    parser.add_argument("--build-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.policies < 10 or args.rules < 1 or args.calls < 100 or args.build_repeats < 1:
        parser.error("need --policies >= 10, --rules >= 1, --calls >= 100, --build-repeats >= 1")

    wl = make_workload()
    raws, counts = make_policies(args.policies, args.rules, args.seed)
    state = MeshState.build((wl,), (), raws)

    build_ns = []
    index = None
    for _ in range(args.build_repeats):
        clear_parse_cache()
        gc.collect()
        start = time.perf_counter_ns()
        index = PolicyIndex.build(state, ROOT)
        build_ns.append(time.perf_counter_ns() - start)
    assert index is not None
    if index.errors:
        raise SystemExit(f"generated policies did not parse: {index.errors[0]}")
    # A config change: one policy edited, everything else as before.
    changed = list(raws)
    changed[-1] = istio(raws[-1].name, raws[-1].namespace, {"rules": [{}]})
    changed_state = MeshState.build((wl,), (), changed)
    gc.collect()
    start = time.perf_counter_ns()
    PolicyIndex.build(changed_state, ROOT)
    rebuild_ns = time.perf_counter_ns() - start

    plain_req = Request(ip_address("172.16.5.5"), None, ip_address("10.20.0.7"), 8080)
    start = time.perf_counter_ns()
    index.evaluate(wl, plain_req)  # compiles the workload's rule set
    first_ns = time.perf_counter_ns() - start
    applicable = index.applicable(wl)

    allowed_req = find_allowed_request(index, wl)
    quarantine = next(
        c.namespaces[0].value
        for p in applicable
        if p.action.value == "DENY"
        for r in p.rules
        for clause in r.clauses
        for c in clause
        if c.namespaces
    )
    deny_req = Request(
        ip_address("172.16.5.5"),
        SpiffeId("cluster.local", quarantine, "x"),
        ip_address("10.20.0.7"),
        8080,
    )
    stranger = Request(
        ip_address("172.16.5.5"),
        SpiffeId("cluster.local", "stranger", "x"),
        ip_address("10.20.0.7"),
        8080,
    )
    kinds = {
        "allowed (ALLOW rule)": allowed_req,
        "denied (DENY rule)": deny_req,
        "denied (no ALLOW match)": stranger,
        "plaintext": plain_req,
    }
    results: dict[str, dict[str, Any]] = {}
    for name, req in kinds.items():
        verdict = index.evaluate(wl, req)
        samples = time_calls(index.evaluate, wl, req, args.calls)
        results[name] = {**summary(samples), "allowed": verdict.allowed, "reason": verdict.reason}

    worst_median = max(r["median_us"] for r in results.values())
    out = {
        "benchmark": "rbac_check",
        "python": platform.python_version(),
        "policies": args.policies,
        "rules_per_policy": args.rules,
        "spread": counts,
        "applicable_to_workload": len(applicable),
        "applicable_rules": sum(len(p.rules) for p in applicable),
        "build_ms": statistics.median(build_ns) / 1e6,
        "rebuild_one_changed_ms": rebuild_ns / 1e6,
        "first_evaluate_ms": first_ns / 1e6,
        "calls_per_kind": args.calls,
        "evaluate": results,
        "target_us": TARGET_US,
        "target_met": worst_median < TARGET_US,
    }

    print(
        f"{args.policies} policies x {args.rules} rules; {len(applicable)} in scope for "
        f"{wl.uid} ({out['applicable_rules']} rules); spread {counts}"
    )
    print(
        f"PolicyIndex.build: {out['build_ms']:.0f} ms cold (median of {args.build_repeats}), "
        f"{out['rebuild_one_changed_ms']:.0f} ms after one policy changed"
    )
    print(f"first evaluate (per-workload index): {out['first_evaluate_ms']:.1f} ms")
    print(f"{'request':<26}{'median us':>11}{'p99 us':>9}  verdict")
    for name, r in results.items():
        print(f"{name:<26}{r['median_us']:>11.2f}{r['p99_us']:>9.2f}  {r['reason']}")
    met = "met" if out["target_met"] else "MISSED"
    print(f"target < {TARGET_US:.0f} us per check (median): {met}")
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
