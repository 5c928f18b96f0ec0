"""memgrowth's pure parts: pymalloc's arena lines, the types that grew, per connection."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from memgrowth import per_connection, type_growth, without_variants

from meshcore.runtime.malloc import parse_pymalloc_stats

MALLOCSTATS = """\
Small block threshold = 512, in 32 size classes.
# arenas allocated total           =                6,193
# arenas reclaimed                 =                6,166
# arenas highwater mark            =                   31
# arenas allocated current         =                   27
27 arenas * 1048576 bytes/arena     =           28,311,552
"""


def test_arena_lines_read() -> None:
    assert parse_pymalloc_stats(MALLOCSTATS) == {"arenas": 27, "arenas_highwater": 31}


def test_no_arena_lines_while_tracing() -> None:
    assert parse_pymalloc_stats("") == {}


def test_types_grown_largest_first_falls_left_out() -> None:
    before = {"a.X": 10, "a.Y": 5, "a.Z": 7}
    after = {"a.X": 12, "a.Y": 50, "a.Z": 3, "a.New": 2}
    assert type_growth(before, after, top=10) == [("a.Y", 45), ("a.New", 2), ("a.X", 2)]
    assert type_growth(before, after, top=1) == [("a.Y", 45)]
    assert type_growth(before, after, top=10, min_delta=3) == [("a.Y", 45)]


def test_per_connection() -> None:
    assert per_connection(500, 1000) == 0.5
    assert per_connection(500, 0) == 0.0


def test_variants_left_out_of_the_childrens_command_line() -> None:
    argv = ["--held", "10", "--variant", "A=1", "--variant=B=2", "--trim"]
    assert without_variants(argv) == ["--held", "10", "--trim"]
