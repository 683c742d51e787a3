"""The SDK callers use: `MeshClient` for the orchestrator, `wait_for_serving` for health,
`field_violations` for the fields a rejected request got wrong."""
from diffmesh.client.client import MeshClient, build_request, field_violations, wait_for_serving
from diffmesh.errors import FieldViolation

__all__ = ["FieldViolation", "MeshClient", "build_request", "field_violations", "wait_for_serving"]
