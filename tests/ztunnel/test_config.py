"""The tunnel's environment parsing: booleans."""

from __future__ import annotations

import pytest

from ztunnel.config import EnvConfigError, parse_config

BASE = {
    "NODE_NAME": "n1",
    "LOCAL_XDS_PATH": "/x.yaml",
    "ENROLMENT_PATH": "/e.yaml",
    "CA_ADDRESS": "/ca.sock",
    "CA_TOKEN_PATH": "/token",
}


def test_same_node_in_process_is_on_unless_turned_off() -> None:
    assert parse_config(BASE).same_node_in_process is True
    for off in ("false", "0", "no", "OFF"):
        assert parse_config({**BASE, "SAME_NODE_IN_PROCESS": off}).same_node_in_process is False
    for on in ("true", "1", "yes", " On "):
        assert parse_config({**BASE, "SAME_NODE_IN_PROCESS": on}).same_node_in_process is True


def test_a_boolean_that_is_not_one_names_the_variable() -> None:
    with pytest.raises(EnvConfigError, match="SAME_NODE_IN_PROCESS='maybe' is not a boolean"):
        parse_config({**BASE, "SAME_NODE_IN_PROCESS": "maybe"})
