"""Errors that compute code raises and the runtime turns into gRPC status codes.

Compute modules import these instead of grpc, so they stay testable without a server; the
server's error interceptor (runtime.server) maps each class to its status code.
"""
from __future__ import annotations

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


class MeshError(Exception):
    """Base class: `code` is the name of a grpc.StatusCode member."""

    code = "INTERNAL"


class InvalidArgument(MeshError):
    """The request is malformed. The message always names the field and the rejected value."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}: {reason} (got {describe_value(value)})")


class ResourceExhausted(MeshError):
    """Admission control: the stage is at capacity; the caller should back off and retry."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(MeshError):
    code = "UNAVAILABLE"


class Cancelled(MeshError):
    """The caller went away; work stopped early."""

    code = "CANCELLED"
