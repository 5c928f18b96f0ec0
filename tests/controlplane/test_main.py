"""`python -m controlplane`'s refusals: bad arguments exit 2 with a message, before any I/O."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.__main__ import main


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
