"""The control plane's Kubernetes tests use the session's real API server (`kube_cp`)."""

from tests.kube.conftest import kube_cp  # noqa: F401  (the fixture, shared by name)
