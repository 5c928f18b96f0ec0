"""CPU per GB from /proc: the split of utime and stime, and the l4 benchmark's use of it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from cpusplit import CpuTimes, costs, parse_io_calls, parse_stat_times, per_gb, read_times

# A real /proc/<pid>/stat line whose command name holds a space and a ')'.
STAT = (
    "4242 (py thon) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 "
    "250 75 0 0 20 0 1 0 123456 1000000 500 18446744073709551615"
)


def test_utime_and_stime_are_fields_14_and_15_after_the_last_parenthesis() -> None:
    assert parse_stat_times(STAT, ticks=100) == CpuTimes(2.5, 0.75, 1000)


def test_read_and_write_calls_come_from_proc_io() -> None:
    text = "rchar: 5\nwchar: 6\nsyscr: 7\nsyscw: 8\nread_bytes: 0\n"
    assert parse_io_calls(text) == (7, 8)


def test_per_gb_scales_the_difference_by_the_bytes_moved() -> None:
    got = per_gb(CpuTimes(1.0, 2.0, 10, 0, 0), CpuTimes(1.5, 3.0, 30, 4000, 2000), 2e9)
    assert got == pytest.approx(
        {
            "user_s_per_gb": 0.25,
            "system_s_per_gb": 0.5,
            "total_s_per_gb": 0.75,
            "minflt_per_mb": 0.01,
            "reads_per_mb": 2.0,
            "writes_per_mb": 1.0,
        }
    )


def test_no_bytes_is_an_error_not_a_division_by_zero() -> None:
    with pytest.raises(ValueError, match="no bytes"):
        per_gb(CpuTimes(0, 0), CpuTimes(1, 1), 0)


def test_a_process_gone_in_either_sample_is_left_out_not_counted_as_free() -> None:
    before = {"a": CpuTimes(0, 0), "b": CpuTimes(0, 0), "c": None}
    after = {"a": CpuTimes(1, 1), "b": None, "c": CpuTimes(1, 1)}
    assert set(costs(before, after, 1e9)) == {"a"}


def test_our_own_process_reads_and_its_user_time_grows_with_work() -> None:
    before = read_times(os.getpid())
    assert before is not None
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    after = read_times(os.getpid())
    assert after is not None and after.user + after.system > before.user + before.system


def test_a_pid_that_does_not_exist_reads_as_none() -> None:
    assert read_times(2**22 + 1) is None  # above pid_max's ceiling
