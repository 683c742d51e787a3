"""Errors that compute code raises and the runtime turns into gRPC status codes.

Compute modules import these instead of grpc, so they stay testable without a server; the
server's error interceptor (runtime.server) maps each class to its status code and, for a
rejected field, to a google.rpc.BadRequest in the status details (diffmesh.error_details).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_MAX_VALUE_CHARS = 80


def describe_value(value: Any) -> str:
    """A short printable form of a rejected value (a 100 kB prompt must not become the message)."""
    text = repr(value)
    if len(text) > _MAX_VALUE_CHARS:
        size = len(value) if hasattr(value, "__len__") else None
        suffix = f"... ({size} long)" if size is not None else "..."
        text = text[:_MAX_VALUE_CHARS] + suffix
    return text


@dataclass(frozen=True)
class FieldViolation:
    """One rejected field: what a caller needs to fix the request. `stage` is set when a stage
    behind the orchestrator rejected it (the field is then that stage's request field)."""

    field: str
    value: str    # the rejected value, shortened (describe_value)
    reason: str
    stage: str = ""


class MeshError(Exception):
    """Base class: `code` is the name of a grpc.StatusCode member."""

    code = "INTERNAL"
    violations: tuple[FieldViolation, ...] = ()


class FieldError(MeshError):
    """An error about one request field: the message and the status details name the field and
    the rejected value."""

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        self.violations = (FieldViolation(field, describe_value(value), reason),)
        super().__init__(f"{field}: {reason} (got {describe_value(value)})")


class InvalidArgument(FieldError):
    """The request is malformed. The message always names the field and the rejected value."""

    code = "INVALID_ARGUMENT"


class FailedPrecondition(MeshError):
    """The mesh cannot serve this kind of request as deployed (a stage it needs is not configured)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(MeshError):
    """Admission control: the stage is at capacity, or the caller is over its rate limit or its
    concurrency quota; the caller should back off and retry. `retry_after_ms`, when known, is how
    long to wait first: the server sends it as `grpc-retry-pushback-ms` trailing metadata."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_ms: int | None = None) -> None:
        self.retry_after_ms = None if retry_after_ms is None else max(int(retry_after_ms), 0)
        super().__init__(message)


class Unavailable(MeshError):
    code = "UNAVAILABLE"


class Cancelled(MeshError):
    """The caller went away; work stopped early."""

    code = "CANCELLED"


class NotFound(MeshError):
    """The named thing does not exist (or no longer: a purged review case)."""

    code = "NOT_FOUND"


class Unauthenticated(MeshError):
    """The caller is not identified: no credentials where the deployment requires them, an unknown
    API key or an unknown client certificate. The message never repeats the credential."""

    code = "UNAUTHENTICATED"


class PermissionDenied(FieldError):
    """The caller is known but may not do this (a model it is not allowed to use). Names the field
    and the value, like InvalidArgument, so the status details say what was refused."""

    code = "PERMISSION_DENIED"
