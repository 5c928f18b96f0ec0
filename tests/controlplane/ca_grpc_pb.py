"""The reference for the CA service: meshcore/identity/proto/ca.proto compiled by protoc
(grpcio-tools) at test time, loaded into the real `google.protobuf` runtime, with the gRPC stub
grpcio generates. Loaded once per process: protobuf's descriptor pool is global."""

from __future__ import annotations

import importlib
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

PROTO_DIR = Path(__file__).resolve().parents[2] / "meshcore" / "identity" / "proto"


@cache
def compiled(out: Path) -> tuple[ModuleType, ModuleType]:
    """(ca_pb2, ca_pb2_grpc) generated into `out`."""
    from grpc_tools import protoc

    well_known = Path(protoc.__file__).parent / "_proto"  # google/protobuf/struct.proto
    rc = protoc.main(
        [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "ca.proto",
        ]
    )
    assert rc == 0, "protoc failed on meshcore/identity/proto/ca.proto"
    sys.path.insert(0, str(out))  # ca_pb2_grpc imports ca_pb2 by its bare name
    try:
        return importlib.import_module("ca_pb2"), importlib.import_module("ca_pb2_grpc")
    finally:
        sys.path.remove(str(out))
