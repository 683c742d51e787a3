"""The SDK callers use: `MeshClient` for the orchestrator, `collect_stream` for a GenerateStream's
images, `wait_for_serving` for health, `field_violations` for the fields a rejected request got
wrong."""
from diffmesh.client.client import (IncompleteStream, MeshClient, build_request, collect_stream, field_violations,
                                    wait_for_serving)
from diffmesh.errors import FieldViolation

__all__ = ["FieldViolation", "IncompleteStream", "MeshClient", "build_request", "collect_stream",
           "field_violations", "wait_for_serving"]
