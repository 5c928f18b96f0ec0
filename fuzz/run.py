"""`make fuzz`: each target under atheris (libFuzzer) for a bounded time, one at a time.

    python -m fuzz.run [--seconds N] [TARGET...]   fuzz (default: every target, N=60)
    python -m fuzz.run --write-seeds [TARGET...]   rebuild fuzz/corpus/ from the encoders

Each target runs in a child process (a crash ends libFuzzer's process): the committed
corpus fuzz/corpus/<target>/ seeds it, new inputs go to a temporary directory (the corpus
in git stays small), and a crashing or hanging input is written to fuzz/crashes/<target>/,
where `make test` replays it (tests/fuzz/test_replay.py) once the bug is fixed. Per target
this prints executions, exec/s, coverage (libFuzzer's `cov`: edges, `ft`: features), the
slowest input's time and crashes.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent
# The packages whose code is instrumented for coverage: ours, and the pure-Python HTTP/2
# and HPACK libraries our connections run on (their paths are what a peer's bytes drive).
INSTRUMENTED = [
    "meshcore", "zds", "ztunnel", "waypoint", "controlplane", "fuzz", "h2", "hpack", "hyperframe",
]  # fmt: skip
# A single input may take this long before it counts as a hang (a loaded 2-core machine
# runs a big YAML document in well under a second).
INPUT_TIMEOUT = 10
RSS_LIMIT_MB = 2048


@dataclass(frozen=True, slots=True)
class Result:
    target: str
    executions: int
    per_second: int
    cov: int
    ft: int
    slowest: int  # seconds the slowest input took (a hang shows here before it is one)
    crashes: list[str]
    exit_code: int


_STATUS = re.compile(r"^#(\d+)\s+\S+\s+cov: (\d+) ft: (\d+)", re.MULTILINE)
_EXECS = re.compile(r"stat::number_of_executed_units: (\d+)")
_SPEED = re.compile(r"stat::average_exec_per_sec:\s+(\d+)")
_SLOWEST = re.compile(r"stat::slowest_unit_time_sec:\s+(\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


def summarize(target: str, log: str, exit_code: int) -> Result:
    """What libFuzzer's log says about a run (pure: the log is all it reads)."""
    status = _STATUS.findall(log)
    last = status[-1] if status else ("0", "0", "0")
    execs = _EXECS.search(log)
    speed = _SPEED.search(log)
    slowest = _SLOWEST.search(log)
    return Result(
        target=target,
        executions=int(execs.group(1)) if execs else int(last[0]),
        per_second=int(speed.group(1)) if speed else 0,
        cov=int(last[1]),
        ft=int(last[2]),
        slowest=int(slowest.group(1)) if slowest else 0,
        crashes=_ARTIFACT.findall(log),
        exit_code=exit_code,
    )


def _worker(target: str, seconds: int) -> None:
    """The child: instrument our packages as the target imports them, then fuzz."""
    import atheris

    with atheris.instrument_imports(include=INSTRUMENTED):
        from fuzz import harness

        test_one_input = harness.entry(target)
    crashes = ROOT / "crashes" / target
    crashes.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-") as new_inputs:
        args = [
            sys.argv[0],
            f"-max_total_time={seconds}",
            f"-timeout={INPUT_TIMEOUT}",
            f"-rss_limit_mb={RSS_LIMIT_MB}",
            f"-artifact_prefix={crashes}/",
            "-print_final_stats=1",
            new_inputs,
            str(ROOT / "corpus" / target),
        ]
        atheris.Setup(args, test_one_input)
        atheris.Fuzz()


def fuzz(target: str, seconds: int) -> Result:
    cmd = [sys.executable, "-m", "fuzz.run", "--worker", target, "--seconds", str(seconds)]
    # libFuzzer's own bound plus start-up; the kill is for a child that ignores it.
    proc = subprocess.run(
        cmd,
        cwd=ROOT.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=seconds + INPUT_TIMEOUT + 120,
        check=False,
    )
    result = summarize(target, proc.stdout, proc.returncode)
    if result.crashes or proc.returncode != 0:
        sys.stdout.write(proc.stdout[-6000:])
    return result


def write_seeds(targets: list[str]) -> None:
    from fuzz import harness

    for target in targets:
        folder = ROOT / "corpus" / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in harness.seeds(target).items():
            (folder / name).write_bytes(data)
        print(f"{target}: {len(harness.seeds(target))} seeds in {folder}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n")[0])
    p.add_argument("targets", nargs="*", metavar="TARGET", help=", ".join(TARGETS))
    p.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    p.add_argument("--write-seeds", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.seconds)
        return 0
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        p.error(f"no fuzz target {', '.join(unknown)}; targets: {', '.join(TARGETS)}")
    targets = list(args.targets) or list(TARGETS)
    if args.write_seeds:
        write_seeds(targets)
        return 0
    results = []
    for target in targets:
        r = fuzz(target, args.seconds)
        results.append(r)
        print(
            f"{r.target:16} executions {r.executions:>9}  exec/s {r.per_second:>6}  "
            f"cov {r.cov:>5}  ft {r.ft:>6}  slowest {r.slowest}s  crashes {len(r.crashes)}",
            flush=True,
        )
        for path in r.crashes:
            print(f"  crash: {path}")
    return 1 if any(r.crashes or r.exit_code for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
