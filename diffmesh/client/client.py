"""A small synchronous client for the orchestrator's public API.

GenerateStream sends each image in its own events (chunks of at most a few MiB, so no message
exceeds the 4 MiB a stock gRPC client accepts) and ends with the info; `collect_stream` turns
such a stream back into the GenerateResponse unary Generate returns, images reassembled. A
request that waits for admission first gets queue-position events (on_queue).

Callers identify themselves with an API key (`MeshClient(api_key=...)`: `authorization: Bearer
<key>` metadata on every call) or an mTLS client certificate (credentials=); `retry_pushback_ms`
reads the retry hint of a RESOURCE_EXHAUSTED.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

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
                  preview_every: int = 0, reference_faces: Sequence[bytes | Path] = (),
                  face_weight: int | None = None, detail_faces: bool = False,
                  base_image: bytes | Path | None = None,
                  face_detailing: orchestrator_pb2.FaceDetailing | dict | None = None,
                  ) -> orchestrator_pb2.GenerateRequest:
    """A GenerateRequest from keyword options (files as paths or bytes). face_detailing: a
    FaceDetailing message or a dict of its fields (e.g. {"strength": 0.5, "prompt": "a [SEP] [SKIP]"})."""
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
    for name, value in (("init_image", init_image), ("change_map", change_map), ("mask", mask),
                        ("base_image", base_image)):
        if value is not None:
            setattr(request, name, _file_bytes(value))
    request.reference_faces.extend(_file_bytes(face) for face in reference_faces)
    if face_weight is not None:
        request.face_weight = face_weight
    request.detail_faces = detail_faces
    if isinstance(face_detailing, dict):
        face_detailing = orchestrator_pb2.FaceDetailing(**face_detailing)
    if face_detailing is not None:
        request.face_detailing.CopyFrom(face_detailing)
    return request


def _file_bytes(value: bytes | Path) -> bytes:
    return value.read_bytes() if isinstance(value, Path) else value


RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


def retry_pushback_ms(error: grpc.RpcError) -> int | None:
    """How long the server asked the caller to wait before retrying (RESOURCE_EXHAUSTED from
    admission: a rate limit, a quota, a full queue), in milliseconds; None when it did not say."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == RETRY_PUSHBACK_KEY:
            try:
                return int(value.decode() if isinstance(value, bytes) else value)
            except ValueError:
                return None
    return None


def field_violations(error: grpc.RpcError) -> list[FieldViolation]:
    """The rejected fields of a failed call (INVALID_ARGUMENT): field, value, reason, and the
    stage behind the orchestrator that rejected it, if one did. Empty for other errors."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return violations_from_metadata(trailing)


class IncompleteStream(RuntimeError):
    """A GenerateStream ended without its result, or with an image whose chunks do not add up."""


def collect_stream(events: Iterable[orchestrator_pb2.GenerateEvent],
                   on_progress: Callable[[orchestrator_pb2.StepProgress], None] | None = None,
                   on_queue: Callable[[orchestrator_pb2.QueuePosition], None] | None = None,
                   ) -> orchestrator_pb2.GenerateResponse:
    """The GenerateResponse a stream amounts to: the result's info with the images reassembled
    from their chunks (in index order). Progress events go to on_progress, queue positions
    (while the request waits for admission, before any progress) to on_queue. Raises
    IncompleteStream when the stream ends without a result or an image's chunks are missing or out
    of order; a gRPC error of the call propagates as it is."""
    files: dict[int, bytearray] = {}
    done: dict[int, orchestrator_pb2.GeneratedImage] = {}
    for event in events:
        kind = event.WhichOneof("event")
        if kind == "queue_position":
            if on_queue is not None:
                on_queue(event.queue_position)
        elif kind == "progress":
            if on_progress is not None:
                on_progress(event.progress)
        elif kind == "image":
            chunk = event.image
            data = files.setdefault(chunk.index, bytearray())
            if chunk.index in done or chunk.offset != len(data):
                raise IncompleteStream(f"image {chunk.index}: chunk {chunk.chunk} at offset {chunk.offset}, "
                                       f"expected offset {len(data)}")
            data += chunk.data
            if chunk.last:
                if len(data) != chunk.file_size:
                    raise IncompleteStream(f"image {chunk.index}: {len(data)} bytes, the server sent {chunk.file_size}")
                done[chunk.index] = orchestrator_pb2.GeneratedImage(
                    image=common_pb2.EncodedImage(data=bytes(files.pop(chunk.index)), mime_type=chunk.mime_type,
                                                  width=chunk.width, height=chunk.height),
                    seed=chunk.seed, index=chunk.index)
                if chunk.HasField("faces"):
                    done[chunk.index].faces.CopyFrom(chunk.faces)
                if chunk.HasField("marking"):
                    done[chunk.index].marking.CopyFrom(chunk.marking)
        elif kind == "result":
            if files:
                raise IncompleteStream(f"image(s) {sorted(files)} ended without their last chunk")
            response = orchestrator_pb2.GenerateResponse()
            response.CopyFrom(event.result)
            if done:  # an older server sends the images inside the result instead
                response.ClearField("images")
                response.images.extend(done[index] for index in sorted(done))
            return response
    raise IncompleteStream("the stream ended without a result")


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
                 credentials: grpc.ChannelCredentials | None = None, api_key: str | None = None) -> None:
        """credentials: grpc.ssl_channel_credentials(...) for a mesh serving (m)TLS (with a client
        certificate: the caller's identity there); api_key: sent as `authorization: Bearer <key>`
        on every call (the orchestrator's callers file lists its hash)."""
        if api_key and (not api_key.strip() or any(c in api_key for c in "\r\n")):
            raise ValueError("api_key: must be a single line of text (empty or None: no key)")
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key.strip()}"),) \
            if api_key else ()
        self._channel = _channel(address, credentials, channel_options(max_message_mb))
        self.stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)

    def generate(self, request: orchestrator_pb2.GenerateRequest,
                 timeout: float | None = None) -> orchestrator_pb2.GenerateResponse:
        return self.stub.Generate(request, timeout=timeout, metadata=self._metadata)

    def generate_stream(self, request: orchestrator_pb2.GenerateRequest,
                        timeout: float | None = None) -> Iterator[orchestrator_pb2.GenerateEvent]:
        return self.stub.GenerateStream(request, timeout=timeout, metadata=self._metadata)

    def generate_streamed(self, request: orchestrator_pb2.GenerateRequest, timeout: float | None = None,
                          on_progress: Callable[[orchestrator_pb2.StepProgress], None] | None = None,
                          on_queue: Callable[[orchestrator_pb2.QueuePosition], None] | None = None,
                          ) -> orchestrator_pb2.GenerateResponse:
        """GenerateStream collected into a GenerateResponse (see collect_stream): works for any
        number and size of images, whatever the client's receive limit."""
        return collect_stream(self.generate_stream(request, timeout=timeout), on_progress, on_queue)

    def fetch_reviewed(self, case_id: str, output_format: int = 0,
                       timeout: float | None = None) -> orchestrator_pb2.GenerateResponse:
        """An approved review case's image (ImageSafety.case_id of an earlier reply), marked and signed."""
        request = orchestrator_pb2.FetchReviewedRequest(case_id=case_id, output_format=output_format)
        return self.stub.FetchReviewed(request, timeout=timeout, metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MeshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
