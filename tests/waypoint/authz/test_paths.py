"""Path templates and the policy parser under generated input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.state import MeshConfigError
from waypoint.authz.parse import load_l7_policy, parse_l7_policy
from waypoint.authz.paths import PathTemplateError, parse_path, path_only

PATH_CASES = [
    ("/a/{*}", "/a/b", True),
    ("/a/{*}", "/a/", False),
    ("/a/{*}", "/a/b/c", False),
    ("/a/{*}/c", "/a/b/c", True),
    ("/a/{*}/c", "/a//c", False),
    ("/a/{**}", "/a/", True),
    ("/a/{**}", "/a/b/c/d", True),
    ("/a/{**}", "/a", False),
    ("/a/{**}", "/ab/c", False),
    ("/{**}", "/", True),
    ("/{*}/{**}", "/x/y/z", True),
    ("/{*}/{**}", "/x", False),
    ("/api/*", "/api/x/y", True),
    ("*.png", "/img/a.png", True),
    ("*", "/anything", True),
    ("/exact", "/exact/", False),
]


@pytest.mark.parametrize(
    ("template", "path", "expected"), PATH_CASES, ids=[f"{t} ~ {p}" for t, p, _ in PATH_CASES]
)
def test_path_matching(template, path, expected):
    assert parse_path(template).matches(path) is expected


@given(st.text(alphabet="/{}*ab", max_size=12), st.text(alphabet="/ab", max_size=12))
@settings(max_examples=300)
def test_parse_path_never_crashes(template, path):
    try:
        matcher = parse_path(template)
    except PathTemplateError as exc:
        error = str(exc)
        assert template in error
        return
    assert isinstance(matcher.matches(path), bool)


@given(st.text(max_size=20))
def test_path_only_has_no_query(target):
    out = path_only(target)
    assert "?" not in out and "#" not in out and target.startswith(out)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
KEYS = st.sampled_from(
    ["rules", "action", "targetRefs", "targetRef", "selector", "provider", "from", "to", "when"]
)


@given(st.dictionaries(KEYS, JSON, max_size=4))
@settings(max_examples=300)
def test_parser_raises_only_its_error(spec):
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": spec,
    }
    error = None
    try:
        parse_l7_policy(doc)
    except MeshConfigError as exc:
        error = str(exc)
    if error is not None:
        assert error.startswith("AuthorizationPolicy shop/p: ")
        assert load_l7_policy(doc).error == error
