"""`ambientctl explain --http` and `ambientctl routes` on a running cluster with a waypoint
and an HTTPRoute: the route a request would take is the one the waypoint's functions pick,
computed from the mesh config in force; nothing is sent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from localcluster import mesh

pytestmark = pytest.mark.netns

HERE = Path(__file__).parent
CLUSTER_FILE = HERE / "waypoint.yaml"
FILE = str(CLUSTER_FILE)
AMBIENTCTL = Path(sys.executable).parent / "ambientctl"

ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}}]
      filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
      backendRefs: [{name: web, port: 80}]
"""


def ctl(c: mesh.Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(AMBIENTCTL), "--state-root", str(c.state.dir.parent), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_explain_http_shows_the_route_the_waypoint_would_take(
    cluster: mesh.Cluster, tmp_path: Path
) -> None:
    # Before any waypoint: --http says there is none on the path.
    none = ctl(cluster, "explain", FILE, "shop/client", "web:80", "--http", "GET /api/x")
    assert none.returncode == 0, none.stderr
    assert "Waypoint:       none: no waypoint on the path" in none.stdout

    done = ctl(cluster, "waypoint", "apply", FILE, "-n", "shop", "--enroll-namespace", "--wait",
               "--timeout", "60")  # fmt: skip
    assert done.returncode == 0, done.stderr
    route = tmp_path / "route.yaml"
    route.write_text(ROUTE)
    applied = ctl(cluster, "apply", FILE, "-f", str(route), "--wait")
    assert applied.returncode == 0, applied.stderr

    out = ctl(cluster, "explain", FILE, "shop/client", "web:80", "--http", "GET /api/x",
              "-H", "x-user: ada", "-o", "json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["waypoint"]["status"] == "used"
    http = doc["http"]
    assert http["waypoint"] == "shop/waypoint"
    assert http["route"]["matched"] == "HTTPRoute shop/api[0]"
    (backend,) = http["backends"]
    assert backend["service"] == "shop/web.shop.svc.cluster.local"
    assert backend["path"] == "/x"
    assert backend["share"] == 1.0
    assert http["authorization"]["allowed"] is True

    table = ctl(cluster, "explain", FILE, "shop/client", "web:80", "--http", "GET /other")
    assert table.returncode == 0, table.stderr
    assert "Route:          default (no route matched" in table.stdout
    assert "Outcome:        404: route not found" in table.stdout

    routes = ctl(cluster, "routes", FILE, "-n", "shop", "-o", "json")
    assert routes.returncode == 0, routes.stderr
    (row,) = [r for r in json.loads(routes.stdout) if r["route"] == "shop/api"]
    assert (row["service"], row["status"]) == ("web", "Accepted, ResolvedRefs")

    bad = ctl(cluster, "explain", FILE, "shop/client", "web:80", "--http", "GET nopath")
    assert bad.returncode == 2 and "must start with '/'" in bad.stderr
