"""One chaos event end to end (benchmarks/chaos.py's cluster, one kill): SIGKILL of the
client node's tunnel under load, restarted as a kubelet would. Nothing may fail open (no
plaintext marker and no non-HBONE TCP on the node link, no success while the tunnel was
dead, the pods' capture rules in place while it was) and nothing may be left stale (rules,
listeners, netns fds, processes of the killed tunnel)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from pyroute2 import netns as pr_netns

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from chaosbench import cluster as cl
from chaosbench import event, targets, verdict

from localcluster import mesh

pytestmark = pytest.mark.netns


def test_kill_the_client_tunnel_under_load_fails_closed_and_leaves_nothing_stale() -> None:
    state_root = Path(tempfile.mkdtemp(prefix="chaos-test-"))
    c = cl.up(state_root)
    try:
        (t,) = [t for t in targets.targets(c) if t.label == "tunnel node1"]
        settings = event.Settings(backoff=0.5, warmup=1.0, tail=1.5)
        rec = event.run(c, t, 1, settings, state_root)
    finally:
        mesh.down(c.spec.name, state_root)
        shutil.rmtree(state_root, ignore_errors=True)
    assert not [n for n in pr_netns.listnetns() if n.startswith(f"{c.spec.name}-")]
    assert rec["findings"] == {"plaintext": [], "bypass": [], "stale": [], "unexpected": []}
    l4, l7 = rec["paths"]["l4"], rec["paths"]["l7"]
    # The tunnel was dead for the backoff, and both paths felt it, closed: a connection
    # tried meanwhile was refused, or held (the capture drops a SYN for a tunnel port no
    # one listens on, so the client retries) until the restarted tunnel served it. Which
    # of the two depends on how fast the restart was; none worked while it was dead
    # (findings.bypass above), and both came back.
    down, up = rec["times"]["down_at"], rec["times"]["restarted_at"]
    for path in (l4, l7):
        felt = [
            (began, ended, ok)
            for began, ended, ok, error in path["timeline"]
            if not str(error or "").startswith(verdict.NOT_MADE)
            and began < up
            and ended >= down
            and (not ok or ended >= up)
        ]
        assert felt, "no connection tried while the tunnel was dead"
        assert path["recovery_s"] is not None
    # The client's long-lived connections went through it: they are lost, none survives.
    assert l4["long_lost"] == l4["long_total"] > 0
    assert rec["capture"]["hbone_packets"] > 0
