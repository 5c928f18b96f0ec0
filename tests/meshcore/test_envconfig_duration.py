"""Go durations in a proxy's environment (Istio's SECRET_TTL=24h): the pure parser, the
reader that names the variable, and the lifetime set in seconds or as a duration."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcore.envconfig import (
    GO_DURATION_UNITS,
    NANOSECONDS,
    EnvConfigError,
    duration_seconds,
    go_duration,
    ttl_seconds,
)

H, M, S, MS = 3600 * NANOSECONDS, 60 * NANOSECONDS, NANOSECONDS, NANOSECONDS // 1000


@pytest.mark.parametrize(
    ("text", "nanoseconds"),
    [
        ("24h", 24 * H),
        ("90m", 90 * M),
        ("60s", 60 * S),
        ("1h30m", H + 30 * M),
        ("1h30m15s", H + 30 * M + 15 * S),
        ("1.5h", H + 30 * M),
        (".5h", 30 * M),
        ("5.h", 5 * H),
        ("2m0.5s", 2 * M + S // 2),
        ("1500ms", 1500 * MS),
        ("3us", 3000),
        ("3\u00b5s", 3000),  # micro sign
        ("3\u03bcs", 3000),  # Greek mu: Go takes both
        ("7ns", 7),
        ("+1h", H),
        ("0", 0),  # Go's one duration without a unit
        ("0s", 0),
        ("1.0000000001s", S),  # below a nanosecond: truncated, as Go does
        ("10h10h", 20 * H),  # Go adds repeated units up
    ],
)
def test_go_durations_read_as_go_reads_them(text: str, nanoseconds: int) -> None:
    assert go_duration(text) == nanoseconds


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("+", "empty"),
        ("-1h", "negative"),
        ("-0", "negative"),
        ("1x", "unknown unit 'x'"),
        ("1d", "unknown unit 'd'"),  # Go has no days
        ("1H", "unknown unit 'H'"),  # nor capitals
        ("90", "'90' has no unit"),
        ("1h30", "'30' has no unit"),
        ("1.5", "'1.5' has no unit"),
        ("h", "a number is missing before 'h'"),
        (".h", "a number is missing"),
        ("1h.", "a number is missing"),
        ("1.2.3s", "'1.2' has no unit"),
        ("1h 30m", "unknown unit 'h '"),
        ("1e3s", "unknown unit 'e'"),
        ("\uff11h", "a number is missing"),  # a fullwidth digit is not a digit here
    ],
)
def test_what_go_would_refuse_or_a_negative_is_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        go_duration(text)


PARTS = st.tuples(st.integers(0, 10**6), st.sampled_from(sorted(GO_DURATION_UNITS)))


@given(st.lists(PARTS, min_size=1, max_size=5))
def test_any_sum_of_parts_reads_back(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{unit}" for n, unit in parts)
    assert go_duration(text) == sum(n * GO_DURATION_UNITS[unit] for n, unit in parts)


@given(st.text(max_size=12))
def test_anything_else_is_a_value_error_or_a_non_negative_duration(text: str) -> None:
    with contextlib.suppress(ValueError):
        assert go_duration(text) >= 0


def test_the_reader_names_the_variable_and_checks_the_range() -> None:
    assert duration_seconds({}, "SECRET_TTL", 5, 604800) is None
    assert duration_seconds({"SECRET_TTL": ""}, "SECRET_TTL", 5, 604800) is None
    assert duration_seconds({"SECRET_TTL": " 24h "}, "SECRET_TTL", 5, 604800) == 86400
    assert duration_seconds({"SECRET_TTL": "5s"}, "SECRET_TTL", 5, 604800) == 5
    assert duration_seconds({"SECRET_TTL": "168h"}, "SECRET_TTL", 5, 604800) == 604800
    bad = [
        ("1x", r"SECRET_TTL='1x' is not a duration like 24h, 90m or 1h30m: unknown unit 'x'"),
        ("-1h", "SECRET_TTL='-1h' is not a duration .*negative"),
        ("90", "SECRET_TTL='90' is not a duration .*has no unit"),
        ("4s", r"SECRET_TTL=4s \(4 s\) is outside 5..604800 seconds"),
        ("0", r"SECRET_TTL=0 \(0 s\) is outside 5..604800 seconds"),
        ("169h", r"SECRET_TTL=169h \(608400 s\) is outside 5..604800 seconds"),
        ("90.5s", "SECRET_TTL='90.5s' is not a whole number of seconds"),
    ]
    for raw, message in bad:
        with pytest.raises(EnvConfigError, match=message):
            duration_seconds({"SECRET_TTL": raw}, "SECRET_TTL", 5, 604800)


def ttl(env: dict[str, str]) -> int:
    return ttl_seconds(env, "CERT_TTL_SECONDS", "SECRET_TTL", 86400, 5, 604800)


@pytest.mark.parametrize(
    ("env", "seconds"),
    [
        ({}, 86400),  # the default
        ({"CERT_TTL_SECONDS": "3600"}, 3600),
        ({"SECRET_TTL": "2h"}, 7200),  # not compared with the default: that is no setting
        ({"CERT_TTL_SECONDS": "5400", "SECRET_TTL": "1h30m"}, 5400),  # both, agreeing
        ({"CERT_TTL_SECONDS": "", "SECRET_TTL": "90m"}, 5400),  # empty is unset
        ({"CERT_TTL_SECONDS": "60", "SECRET_TTL": ""}, 60),
    ],
)
def test_the_lifetime_in_seconds_or_as_a_duration(env: dict[str, str], seconds: int) -> None:
    assert ttl(env) == seconds


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"CERT_TTL_SECONDS": "3600", "SECRET_TTL": "2h"},
            r"CERT_TTL_SECONDS=3600 and SECRET_TTL=2h \(7200 s\) disagree: set one of them",
        ),
        # Each is checked on its own first: the error names the one that is wrong.
        ({"CERT_TTL_SECONDS": "3600", "SECRET_TTL": "1x"}, "SECRET_TTL='1x'"),
        ({"CERT_TTL_SECONDS": "1", "SECRET_TTL": "1s"}, "CERT_TTL_SECONDS=1 is outside 5..604800"),
        ({"CERT_TTL_SECONDS": "soon", "SECRET_TTL": "1h"}, "CERT_TTL_SECONDS='soon'"),
    ],
)
def test_both_set_and_disagreeing_or_either_bad_is_refused(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(EnvConfigError, match=message):
        ttl(env)
