"""`ambientctl.progress`: the spinner line and the step lines as written, on a terminal and
elsewhere (a fake clock; the spinner thread is exercised by the pty test of `up`)."""

from __future__ import annotations

import io

import pytest

from ambientctl import progress as pg


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0.0s"), (9.94, "9.9s"), (10.2, "10s"), (59.9, "59s"), (61, "1m01s"), (725, "12m05s")],
)
def test_elapsed_text(seconds: float, text: str) -> None:
    assert pg.elapsed_text(seconds) == text


def test_spinner_line_is_one_cleared_line_cut_to_the_terminal() -> None:
    line = pg.spinner_line(pg.ASCII_FRAMES, 5, "starting the tunnel on node1", 2.5)
    assert line == "\r\x1b[K/ starting the tunnel on node1 (2.5s)"
    cut = pg.spinner_line(pg.ASCII_FRAMES, 0, "x" * 100, 1.0, width=40)
    assert cut.startswith(pg.CLEAR_LINE) and len(cut) - len(pg.CLEAR_LINE) == 39
    assert cut.endswith("...") and "\n" not in cut


def test_frames_follow_the_encoding() -> None:
    assert pg.frames_for("UTF-8") == pg.UNICODE_FRAMES
    assert pg.frames_for("ascii") == pg.ASCII_FRAMES
    assert pg.frames_for(None) == pg.ASCII_FRAMES


def test_not_a_terminal_one_plain_line_per_step_and_the_result_on_stdout() -> None:
    err, out = io.StringIO(), io.StringIO()
    with pg.Progress(err, out, clock=Clock()) as p:
        p("building the network")
        p.step("starting the tunnel")
        p.status("not shown: the caller printed its own line")
        p.done("cluster x is up")
    assert err.getvalue() == "building the network\nstarting the tunnel\n"
    assert out.getvalue() == "cluster x is up\n"


def test_terminal_each_finished_step_is_left_above_the_spinner() -> None:
    err, out, clock = Tty(), io.StringIO(), Clock()
    p = pg.Progress(err, out, clock=clock)
    assert p.tty and p.frames == pg.UNICODE_FRAMES
    p.step("building the network")
    clock.now += 1.5
    p.step("waiting for the tunnels")
    clock.now += 12
    p.done("cluster x is up")
    text = err.getvalue()
    assert "✓ building the network (1.5s)\n" in text
    assert "✓ waiting for the tunnels (12s)\n" in text
    assert text.index("building") < text.index("waiting")
    assert out.getvalue() == "cluster x is up\n"


def test_a_failure_leaves_the_unfinished_step_marked() -> None:
    err, clock = Tty(), Clock()

    def failing() -> None:
        with pg.Progress(err, io.StringIO(), clock=clock) as p:
            p.step("waiting for the tunnels")
            clock.now += 3
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        failing()
    assert err.getvalue().endswith("\r\x1b[K✗ waiting for the tunnels (3.0s)\n")


def test_wrapped_stdout_writes_above_the_spinner_and_headings_become_its_text() -> None:
    err, clock = Tty(), Clock()
    p = pg.Progress(err, io.StringIO(), clock=clock)
    shown = p.wrap(err)
    p.status("first")
    shown.write("== the policy chapter\n   detail")
    shown.write(" line\n")
    p.done()
    text = err.getvalue()
    assert "== the policy chapter\n" in text
    assert "   detail line\n" in text
    # The heading replaced the spinner's text; a status leaves no finished line behind.
    assert "the policy chapter (0.0s)" in text.split("== the policy chapter\n", 1)[1]
    assert "✓ first" not in text


def test_wrap_is_the_stream_itself_off_a_terminal() -> None:
    plain = io.StringIO()
    assert pg.Progress(io.StringIO(), io.StringIO()).wrap(plain) is plain


@pytest.mark.parametrize(
    ("current", "new", "same"),
    [
        ("waiting for the tunnels: 0/2 nodes", "waiting for the tunnels: 1/2 nodes", True),
        ("waiting for the tunnels: 2/2 nodes", "starting the apps", False),
        ("building the network: 2 nodes", "waiting for the tunnels: 0/2 nodes", False),
        (None, "waiting for the tunnels: 0/2 nodes", False),
        ("starting the CA", "starting the CA", False),  # no news: a step of its own
    ],
)
def test_news_of_a_step_is_told_by_the_words_before_the_colon(
    current: str | None, new: str, same: bool
) -> None:
    assert pg.same_step(current, new) is same


def test_terminal_news_of_a_step_changes_the_spinner_line_and_keeps_its_clock() -> None:
    err, clock = Tty(), Clock()
    p = pg.Progress(err, io.StringIO(), clock=clock)
    p.step("waiting for the tunnels: 0/2 nodes")
    clock.now += 1
    p.step("waiting for the tunnels: 2/2 nodes")
    clock.now += 1
    p.step("starting the apps")
    p.done()
    text = err.getvalue()
    assert "✓ waiting for the tunnels: 0/2" not in text
    assert "\r\x1b[K✓ waiting for the tunnels: 2/2 nodes (2.0s)\n" in text
    assert "✓ starting the apps (0.0s)\n" in text


def test_a_heading_the_caller_printed_is_not_repeated_as_a_finished_step() -> None:
    err, clock = Tty(), Clock()
    p = pg.Progress(err, io.StringIO(), clock=clock)
    p.status("bringing up the cluster")
    p.step("building the network")
    p.done()
    assert "✓ bringing up" not in err.getvalue()
    assert "✓ building the network" in err.getvalue()


def test_leaving_the_block_ends_the_last_step_as_a_line() -> None:
    err = Tty()
    with pg.Progress(err, io.StringIO(), clock=Clock()) as p:
        p.step("removing 3 network namespaces")
        p.status("demo succeeded")
    text = err.getvalue()
    assert "✓ removing 3 network namespaces (0.0s)\n" in text
    assert text.endswith(pg.CLEAR_LINE)  # the heading's spinner is cleared, not left
