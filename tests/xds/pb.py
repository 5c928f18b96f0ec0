"""The reference: meshcore/xds/proto compiled by protoc (grpcio-tools) at test time and loaded
into the real `google.protobuf` runtime."""

from __future__ import annotations

import importlib
import sys
import tempfile
from functools import cache
from pathlib import Path
from types import ModuleType

PROTO_DIR = Path(__file__).resolve().parents[2] / "meshcore" / "xds" / "proto"
FILES = (
    "workload.proto",
    "authorization.proto",
    "ambient.proto",
    "google/rpc/status.proto",
    "envoy/config/core/v3/base.proto",
    "envoy/service/discovery/v3/discovery.proto",
)


@cache
def compiled() -> Path:
    """The generated *_pb2 / *_pb2_grpc modules' directory, on sys.path (once per process:
    the descriptor pool is global)."""
    import grpc_tools
    from grpc_tools import protoc

    out = Path(tempfile.mkdtemp(prefix="xds_pb2_"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *FILES,
        ]
    )
    assert rc == 0, "protoc failed on meshcore/xds/proto"
    # No __init__.py anywhere: `google` and `envoy` stay namespace packages, so the
    # generated google/rpc joins the installed google.protobuf.
    sys.path.insert(0, str(out))
    return out


def module(name: str) -> ModuleType:
    """A generated module by its import name, e.g. "workload_pb2"."""
    compiled()
    return importlib.import_module(name)


def workload() -> ModuleType:
    return module("workload_pb2")


def authorization() -> ModuleType:
    return module("authorization_pb2")


def ambient() -> ModuleType:
    return module("ambient_pb2")


def discovery() -> ModuleType:
    return module("envoy.service.discovery.v3.discovery_pb2")


def discovery_grpc() -> ModuleType:
    return module("envoy.service.discovery.v3.discovery_pb2_grpc")
