"""A small synchronous client for the orchestrator's public API."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from diffmesh.error_details import violations_from_metadata
from diffmesh.errors import FieldViolation
from diffmesh.proto.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from diffmesh.runtime.channels import channel_options, channel_target

_FORMATS = {"png": common_pb2.PNG, "jpeg": common_pb2.JPEG, "jpg": common_pb2.JPEG, "webp": common_pb2.WEBP}


def build_request(prompt: str, *, negative_prompt: str | None = None, model: str = "",
                  width: int | None = None, height: int | None = None, steps: int | None = None,
                  scheduler: str = "", guidance_scale: float | None = None, seed: int | None = None,
                  count: int | None = None, init_image: bytes | Path | None = None,
                  strength: float | None = None, output_format: str = "png", quality: int = 0,
                  request_key: str = "", prompt_2: str | None = None, negative_prompt_2: str | None = None,
                  clip_skip: int | None = None, literal_prompt: bool = False,
                  timesteps: list[int] | None = None, timestep_anchors: list[int] | None = None,
                  timestep_spacing: str = "", sigma_schedule: str = "", guidance_rescale: float | None = None,
                  change_map: bytes | Path | None = None, mask: bytes | Path | None = None,
                  mask_feather: float | None = None, paste_back: bool = False,
                  preview_every: int = 0) -> orchestrator_pb2.GenerateRequest:
    request = orchestrator_pb2.GenerateRequest(
        prompt=prompt, model=model, scheduler=scheduler, quality=quality, request_key=request_key,
        literal_prompt=literal_prompt, timesteps=timesteps or [], timestep_anchors=timestep_anchors or [],
        timestep_spacing=timestep_spacing, sigma_schedule=sigma_schedule, paste_back=paste_back,
        preview_every=preview_every)
    fmt = _FORMATS.get(output_format.lower())
    if fmt is None:
        raise ValueError(f"output_format must be one of {', '.join(_FORMATS)}, got {output_format!r}")
    request.output_format = fmt
    optional = dict(negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                    guidance_scale=guidance_scale, seed=seed, count=count, strength=strength, prompt_2=prompt_2,
                    negative_prompt_2=negative_prompt_2, clip_skip=clip_skip, guidance_rescale=guidance_rescale,
                    mask_feather=mask_feather)
    for name, value in optional.items():
        if value is not None:
            setattr(request, name, value)
    for name, value in (("init_image", init_image), ("change_map", change_map), ("mask", mask)):
        if value is not None:
            setattr(request, name, value.read_bytes() if isinstance(value, Path) else value)
    return request


def field_violations(error: grpc.RpcError) -> list[FieldViolation]:
    """The rejected fields of a failed call (INVALID_ARGUMENT): field, value, reason, and the
    stage behind the orchestrator that rejected it, if one did. Empty for other errors."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return violations_from_metadata(trailing)


def _channel(address: str, credentials: grpc.ChannelCredentials | None, options=None) -> grpc.Channel:
    target = channel_target(address)
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=options)
    return grpc.insecure_channel(target, options=options)


def wait_for_serving(address: str, timeout: float = 60.0, service: str = "",
                     credentials: grpc.ChannelCredentials | None = None) -> None:
    """Blocks until the server at address reports SERVING; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    with _channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout:.0f}s")
            time.sleep(0.1)


class MeshClient:
    def __init__(self, address: str = "127.0.0.1:50051", max_message_mb: int = 256,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        """credentials: grpc.ssl_channel_credentials(...) for a mesh serving (m)TLS."""
        self._channel = _channel(address, credentials, channel_options(max_message_mb))
        self.stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)

    def generate(self, request: orchestrator_pb2.GenerateRequest,
                 timeout: float | None = None) -> orchestrator_pb2.GenerateResponse:
        return self.stub.Generate(request, timeout=timeout)

    def generate_stream(self, request: orchestrator_pb2.GenerateRequest,
                        timeout: float | None = None) -> Iterator[orchestrator_pb2.GenerateEvent]:
        return self.stub.GenerateStream(request, timeout=timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MeshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
