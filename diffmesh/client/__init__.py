"""The SDK callers use: `MeshClient` for the orchestrator, `wait_for_serving` for health."""
from diffmesh.client.client import MeshClient, build_request, wait_for_serving

__all__ = ["MeshClient", "build_request", "wait_for_serving"]
