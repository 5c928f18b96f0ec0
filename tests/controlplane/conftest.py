"""The real API server for the gRPC CA's tests (tests/kube/conftest.py's session fixture)."""

from tests.kube.conftest import kube_cp

__all__ = ["kube_cp"]
