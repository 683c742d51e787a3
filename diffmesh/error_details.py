"""Structured error details on the wire: google.rpc.Status in the `grpc-status-details-bin`
trailer (the standard every gRPC language reads), carrying a google.rpc.BadRequest with one field
violation per rejected field and a google.rpc.ErrorInfo per violation with its value and, when a
stage behind the orchestrator rejected it, the stage.

Pure protobuf: the servers' error mapping writes it, the orchestrator reads a stage's and passes
it on, and the client SDK reads it for callers.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from google.rpc import code_pb2, error_details_pb2, status_pb2

from diffmesh.errors import FieldViolation

DETAILS_KEY = "grpc-status-details-bin"
DOMAIN = "diffmesh.v1"
REASON = "FIELD_REJECTED"


def status_details(code: str, message: str, violations: Sequence[FieldViolation]) -> bytes:
    """The serialized google.rpc.Status for a status code name, its message and violations."""
    status = status_pb2.Status(code=code_pb2.Code.Value(code), message=message)
    if violations:
        bad = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.reason, reason=REASON)
            for v in violations])
        status.details.add().Pack(bad)
        for v in violations:
            metadata = {"field": v.field, "value": v.value}
            if v.stage:
                metadata["stage"] = v.stage
            status.details.add().Pack(error_details_pb2.ErrorInfo(reason=REASON, domain=DOMAIN, metadata=metadata))
    return status.SerializeToString()


def trailing_metadata(code: str, message: str, violations: Sequence[FieldViolation]) -> tuple[tuple[str, bytes], ...]:
    return ((DETAILS_KEY, status_details(code, message, violations)),)


def violations_from_metadata(metadata: Iterable[tuple[str, bytes | str]] | None) -> list[FieldViolation]:
    """The field violations in a call's trailing metadata (empty when it carries none)."""
    raw = next((value for key, value in metadata or () if key == DETAILS_KEY), None)
    if not raw:
        return []
    status = status_pb2.Status.FromString(raw if isinstance(raw, bytes) else raw.encode("latin-1"))
    reasons: list[tuple[str, str]] = []
    extra: list[dict[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            reasons += [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == DOMAIN:
                extra.append(dict(info.metadata))
    found = []
    for i, (field, reason) in enumerate(reasons):
        meta = extra[i] if i < len(extra) and extra[i].get("field") == field else {}
        found.append(FieldViolation(field=field, value=meta.get("value", ""), reason=reason,
                                    stage=meta.get("stage", "")))
    return found
