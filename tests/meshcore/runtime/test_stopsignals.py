"""A process's stop signals reach its own callback, and a child it forks dies of them.

Each case runs in a child process of its own (signal handlers are process-wide), which
forks a helper as pyroute2 does and stops it with SIGTERM.
"""

from __future__ import annotations

import pytest

from tests.support.child import run_child

# The child: install handlers one way or the other, fork a helper that sleeps in Python
# (where a Python-level handler would run), SIGTERM it, and see how it ended within 5 s.
CODE = r"""
import json, os, signal, sys, time
from meshcore.runtime.stopsignals import on_stop_signal

how = sys.argv[1]
got = []
if how == "plain":
    signal.signal(signal.SIGTERM, lambda signum, _f: got.append(signum))
else:
    on_stop_signal(got.append)
handler = signal.getsignal(signal.SIGTERM)

pid = os.fork()
if pid == 0:
    if how == "window":
        # As if the signal came between the fork and the at-fork hook.
        signal.signal(signal.SIGTERM, handler)
        os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):
        time.sleep(0.1)
    os._exit(7)  # lived through it

time.sleep(0.2)
os.kill(pid, signal.SIGTERM)
deadline = time.monotonic() + 5
status = None
while time.monotonic() < deadline:
    done, st = os.waitpid(pid, os.WNOHANG)
    if done:
        status = st
        break
    time.sleep(0.05)
if status is None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    ended = "alive"
elif os.WIFSIGNALED(status):
    ended = signal.Signals(os.WTERMSIG(status)).name
else:
    ended = f"exit {os.WEXITSTATUS(status)}"

# The parent's own SIGTERM still reaches its callback.
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.05)
print("RESULT " + json.dumps({"helper": ended, "parent_got": got}))
"""


@pytest.mark.parametrize("how", ["hooked", "window"])
def test_a_forked_helper_dies_of_sigterm_and_the_parent_still_gets_its_own(how: str) -> None:
    result, _ = run_child(CODE, how, timeout=30)
    assert result == {"helper": "SIGTERM", "parent_got": [15]}


def test_with_a_plain_handler_the_helper_lives_on_which_is_the_hazard() -> None:
    """What the module is for: a plain Python handler, inherited, keeps the helper alive
    (so a parent waiting for it without a timeout waits for ever)."""
    result, _ = run_child(CODE, "plain", timeout=30)
    assert result == {"helper": "alive", "parent_got": [15]}
