"""The reference: zds/zds.proto compiled by protoc (grpcio-tools) and loaded into the real
`google.protobuf` runtime, plus conversions between its messages and ours."""

from __future__ import annotations

import importlib.util
import tempfile
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from zds.messages import (
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    SnapshotSent,
    WorkloadInfo,
    WorkloadRequest,
    WorkloadResponse,
    ZdsHello,
)

PROTO_DIR = Path(__file__).resolve().parents[2] / "zds"


@cache
def reference() -> ModuleType:
    """zds_pb2, generated at test time (once per process: the descriptor pool is global)."""
    from grpc_tools import protoc

    out = Path(tempfile.mkdtemp(prefix="zds_pb2_"))
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", "zds.proto"])
    assert rc == 0, "protoc failed on zds/zds.proto"
    spec = importlib.util.spec_from_file_location("zds_pb2", out / "zds_pb2.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def to_pb(msg: Any) -> Any:
    pb = reference()
    if isinstance(msg, ZdsHello):
        return pb.ZdsHello(version=msg.version)
    if isinstance(msg, WorkloadInfo):
        return pb.WorkloadInfo(
            name=msg.name, namespace=msg.namespace, service_account=msg.service_account
        )
    if isinstance(msg, AddWorkload):
        out = pb.AddWorkload(uid=msg.uid)
        if msg.workload_info is not None:
            out.workload_info.CopyFrom(to_pb(msg.workload_info))
        return out
    if isinstance(msg, KeepWorkload):
        return pb.KeepWorkload(uid=msg.uid)
    if isinstance(msg, DelWorkload):
        return pb.DelWorkload(uid=msg.uid)
    if isinstance(msg, SnapshotSent):
        return pb.SnapshotSent()
    if isinstance(msg, Ack):
        return pb.Ack(error=msg.error)
    if isinstance(msg, WorkloadRequest):
        field = {
            AddWorkload: "add",
            KeepWorkload: "keep",
            DelWorkload: "del",
            SnapshotSent: "snapshot_sent",
        }[type(msg.payload)]
        out = pb.WorkloadRequest()
        getattr(out, field).CopyFrom(to_pb(msg.payload))
        return out
    if isinstance(msg, WorkloadResponse):
        out = pb.WorkloadResponse()
        out.ack.CopyFrom(to_pb(msg.payload))
        return out
    raise TypeError(msg)


def from_pb(m: Any) -> Any:
    """Ours from theirs; None for a request/response without a payload (we reject those)."""
    name = m.DESCRIPTOR.name
    if name == "ZdsHello":
        return ZdsHello(m.version)
    if name == "WorkloadInfo":
        return WorkloadInfo(m.name, m.namespace, m.service_account)
    if name == "AddWorkload":
        info = from_pb(m.workload_info) if m.HasField("workload_info") else None
        return AddWorkload(m.uid, info)
    if name == "KeepWorkload":
        return KeepWorkload(m.uid)
    if name == "DelWorkload":
        return DelWorkload(m.uid)
    if name == "SnapshotSent":
        return SnapshotSent()
    if name == "Ack":
        return Ack(m.error)
    if name in ("WorkloadRequest", "WorkloadResponse"):
        which = m.WhichOneof("payload")
        if which is None:
            return None
        inner = from_pb(getattr(m, which))
        return WorkloadRequest(inner) if name == "WorkloadRequest" else WorkloadResponse(inner)
    raise TypeError(name)
