"""The SDK callers use: `MeshClient` for the orchestrator (api_key= or an mTLS client certificate
identifies the caller), `collect_stream` for a GenerateStream's images, `wait_for_serving` for
health, `field_violations` for the fields a rejected request got wrong, `retry_pushback_ms` for
how long a RESOURCE_EXHAUSTED asks to wait."""
from diffmesh.client.client import (IncompleteStream, MeshClient, build_request, collect_stream, field_violations,
                                    retry_pushback_ms, wait_for_serving)
from diffmesh.errors import FieldViolation

__all__ = ["FieldViolation", "IncompleteStream", "MeshClient", "build_request", "collect_stream",
           "field_violations", "retry_pushback_ms", "wait_for_serving"]
