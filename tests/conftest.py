"""Test tiers: pure and in-process tests run anywhere; `netns` tests need root.

Under CI (CI=true) a netns test that cannot run is a failure, never a silent skip.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pluggy
import pytest

from localcluster.kube.apiserver import KubeControlPlane
from tests.scripts.programs import ProgramGuard, read_list
from tests.support.aio import Loop
from tests.support.failure import PHASE_REPORTS

# Every program a test starts must be in scripts/programs.txt, which setup installs: an audit
# hook records any other, and the test that ran it fails (at teardown, naming the program).
# Each process of the run (xdist's workers too) has its own hook.
_PROGRAMS = ProgramGuard(read_list())


def pytest_configure(config: pytest.Config) -> None:
    _PROGRAMS.install()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, None]:
    _PROGRAMS.current = item.nodeid
    yield
    _PROGRAMS.current = "between tests"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    outcome = yield
    # Kept for fixtures that print diagnostics when the test failed (tests.support.failure).
    item.stash.setdefault(PHASE_REPORTS, {})[call.when] = outcome.get_result()
    if call.when == "teardown" and _PROGRAMS.violations:
        # Also what ran before this test, while collecting: reported by the first test after.
        ran = "; ".join(f"{program} (in {where})" for where, program in _PROGRAMS.violations)
        _PROGRAMS.violations.clear()
        report = outcome.get_result()
        report.outcome = "failed"
        report.longrepr = f"ran programs missing from scripts/programs.txt: {ran}"


def _netns_unavailable() -> str:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/proc/self/ns/net"):
        return "no network namespace support"
    return ""


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "netns" not in item.keywords and "kube" not in item.keywords:
        return
    why = _netns_unavailable()
    if not why:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"netns tier must run under CI but cannot: {why}")
    pytest.skip(f"netns tier: {why}")


@pytest.fixture(autouse=True)
def _fresh_event_loop_policy() -> Iterator[None]:
    """`asyncio.run()` ends by leaving the main thread with no current event loop, and code
    that asks for one implicitly (`grpc.aio.server()`) then fails: each test starts with the
    default policy, as in a fresh process."""
    yield
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.set_event_loop_policy(None)


@pytest.fixture
def aio(request: pytest.FixtureRequest) -> Iterator[Loop]:
    """One event loop for the test. What the test `defer`s (or registers with `closing`)
    is cleaned up on that loop when the test ends, whether it passed or failed.
    Parametrize indirectly with a loop name from `tests.support.aio.LOOPS` to choose it."""
    loop = Loop(getattr(request, "param", "asyncio"))
    yield loop
    loop.close()


# The real Kubernetes API server: one per test session (about 5 s to start), shared by every
# test marked `kube` (root tier: the binaries live in root's cache). Each test works in
# namespaces of its own, so sharing is safe.
@pytest.fixture(scope="session")
def kube_cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeControlPlane]:
    cp = KubeControlPlane(Path(tmp_path_factory.mktemp("kube")), die_with_parent=True)
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()
