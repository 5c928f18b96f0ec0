"""SIGINT/SIGTERM become an exception in the main thread, teardowns finish, and the program
says what it tore down. Each case runs a small program as a real process and signals it."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster.interrupt import TornDown, describe

REPO = Path(__file__).resolve().parent.parent.parent

PROGRAM = """
import os, select, signal, sys
from localcluster.interrupt import TornDown, note_teardown, run_interruptible, shielded

def step(what):  # say where we are, then wait for the test's go-ahead
    print(what, flush=True)
    # Polled, not a blocking read: a signal landing just before a blocking call would
    # wait for the call to return before its Python handler runs.
    while not select.select([sys.stdin], [], [], 0.05)[0]:
        pass
    sys.stdin.readline()

def teardown(name):
    with shielded():
        step("tearing down")
        note_teardown(TornDown(name, 3, 2))
    print("torn down", flush=True)

def main():
    mode = sys.argv[1]
    if mode == "shielded":
        teardown("a")  # a normal teardown that a signal must not cut short
        step("after")
        return 0
    try:
        if mode == "fork":
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.write(w, b"up")  # inherits the handler: must die of the signal, not unwind
                sys.stdin.readline()
                os._exit(0)
            os.read(r, 2)
            os.kill(pid, signal.SIGTERM)
            _, status = os.waitpid(pid, 0)
            print("child", os.WIFSIGNALED(status) and os.WTERMSIG(status), flush=True)
        step("working")
    finally:
        teardown("b")
    return 0

sys.exit(run_interruptible(main, "prog"))
"""


class Program:
    def __init__(self, mode: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(PROGRAM), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )

    def expect(self, line: str) -> None:
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == line

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, out, err


@pytest.fixture
def program() -> Iterator[type[Program]]:
    started: list[Program] = []

    class Tracked(Program):
        def __init__(self, mode: str) -> None:
            super().__init__(mode)
            started.append(self)

    yield Tracked
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
        p.proc.communicate()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_runs_the_teardown_and_says_so(program, sig: signal.Signals, code: int) -> None:
    p = program("plain")
    p.expect("working")
    p.proc.send_signal(sig)
    p.expect("tearing down")
    p.proc.send_signal(sig)  # a second one must not cut the teardown short
    p.go()
    rc, out, err = p.finish()
    assert rc == code
    assert out == "torn down\n"
    said = f"prog: interrupted by {sig.name}: tore down cluster b (3 namespaces, 2 processes)"
    assert err == said + "\n"


def test_a_signal_during_a_teardown_waits_until_it_is_done(program) -> None:
    p = program("shielded")
    p.expect("tearing down")
    p.proc.send_signal(signal.SIGTERM)
    p.go()
    rc, out, err = p.finish()
    assert rc == 143
    assert out == ""  # interrupted as the shielded section ended, not before
    assert "tore down cluster a (3 namespaces, 2 processes)" in err


def test_a_forked_child_dies_of_the_signal_instead_of_tearing_down(program) -> None:
    p = program("fork")
    p.expect(f"child {int(signal.SIGTERM)}")
    p.expect("working")
    p.go()
    p.expect("tearing down")
    p.go()
    rc, out, err = p.finish()
    assert (rc, out, err) == (0, "torn down\n", "")


def test_describe() -> None:
    nothing = "interrupted by SIGINT: nothing of this run was left to tear down"
    assert describe("SIGINT", []) == nothing
    both = [TornDown("a", 9, 7), TornDown("b", 0, 0), TornDown("c", 4, 0)]
    assert describe("SIGTERM", both) == (
        "interrupted by SIGTERM: tore down cluster a (9 namespaces, 7 processes), "
        "cluster c (4 namespaces, 0 processes)"
    )
