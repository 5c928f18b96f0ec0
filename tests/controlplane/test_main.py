"""`python -m controlplane`'s refusals: bad arguments exit 2 with a message, before any I/O."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.__main__ import main, parse_args


def test_a_mesh_out_in_a_missing_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nowhere" / "xds.json"
    assert main(["--kubeconfig", str(tmp_path / "kc"), "--mesh-out", str(out)]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_unreadable_credentials_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing-kubeconfig"
    assert main(["--kubeconfig", str(missing), "--mesh-out", str(tmp_path / "x.json")]) == 2
    assert "cannot load Kubernetes credentials" in capsys.readouterr().err


def test_a_debounce_out_of_range_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--mesh-out", "x", "--debounce", "-1"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--admission-port", "15017"], "needs the mesh CA"),
        (["--admission-port", "70000", "--grpc-listen", "127.0.0.1:0"], "is not a port"),
        (["--node-agent-account", "no-slash"], "is not NS/NAME"),
        (["--node-agent-account", "a/b/c"], "is not NS/NAME"),
    ],
)
def test_admission_arguments_are_checked(
    args: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--mesh-out", "x", "--state-dir", "s", *args])
    assert exc.value.code == 2
    assert said in capsys.readouterr().err


def test_the_node_agents_account_defaults_to_the_charts() -> None:
    args = parse_args(["--mesh-out", "x", "--state-dir", "s", "--grpc-listen", "127.0.0.1:0"])
    assert args.node_agent_account == ["istio-system/ambient-node-agent"]
    args = parse_args(["--mesh-out", "x", "--node-agent-account", "agents/a"])
    assert args.node_agent_account == ["agents/a"]
