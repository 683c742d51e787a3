"""One typed client per stage, one method per RPC; the call policy lives here, once.

Every stage call goes through `StageClient._call`: the variant this request routes to (sticky
canary split), one retry layer, canary-to-stable fallback, the `stage <label>` span around the
gRPC client span, the StageTiming (wall, the stage's reported compute and queue time, bytes each
way, phase) and shadow mirroring of stable calls to the canary.

Retries: exactly one layer, here. The channels carry no gRPC retry policy (runtime.channels), so
a call makes at most RETRY_ATTEMPTS transport attempts on a variant (plus as many again on stable
after a failing canary). Only UNAVAILABLE is retried, the code a replica that was killed,
restarted or is draining gives; stage calls are idempotent (seeded), and round_robin sends the
next attempt to another replica. gRPC's own retries cannot cover a stream once it has started,
which is why the layer is ours and not the channel's.

Readiness: before a flow starts, `StageClients.check_reachable` looks at the channel of each stage
it needs (a connectivity-state read, no RPC): a stage none of whose replicas can be reached fails
the request with UNAVAILABLE naming it, before any other stage works, instead of after the text
encoder and the denoiser have run. Channels connect on first use (the first request waits up to
readiness_wait_s for that): connecting at start-up, before the stages have bound their ports,
would leave them in reconnect backoff, failing the first requests although every stage is up.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, TypeVar

import grpc

from diffmesh.error_details import violations_from_metadata
from diffmesh.errors import FailedPrecondition, FieldViolation, MeshError, Unavailable
from diffmesh.proto.v1 import (common_pb2, denoiser_pb2, denoiser_pb2_grpc, face_pb2, face_pb2_grpc, safety_pb2,
                               safety_pb2_grpc, text_encoder_pb2, text_encoder_pb2_grpc, vae_pb2, vae_pb2_grpc)
from diffmesh.runtime import metrics, telemetry
from diffmesh.runtime.logs import elapsed_ms, log_event
from services.orchestrator.routing import CANARY, STABLE, StageRoute, StageRouter
from services.orchestrator.shadow import ShadowDiffer

T = TypeVar("T")
log = logging.getLogger("diffmesh.orchestrator")

# A canary that fails for these reasons is the canary's problem: the call goes to stable instead.
FALLBACK_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                  grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED}
RETRY_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.05
_CONNECTING = (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.CONNECTING)
_UNREACHABLE = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)


async def reachable(channel: grpc.aio.Channel, wait_s: float) -> bool:
    """False when every replica behind the channel has failed to connect (TRANSIENT_FAILURE: a
    call now fails UNAVAILABLE at once, retries included). A channel still connecting gets up to
    wait_s to settle; after that the call goes ahead and the call policy decides, so a slow
    connection is never mistaken for an outage. READY costs no wait and no RPC."""
    state = channel.get_state(try_to_connect=True)
    end = time.monotonic() + wait_s
    while state in _CONNECTING:
        remaining = end - time.monotonic()
        if remaining <= 0:
            return True
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
        except asyncio.TimeoutError:
            return True
        state = channel.get_state(try_to_connect=True)
    return state not in _UNREACHABLE


class StageCallError(MeshError):
    """A stage failed or rejected the call: keeps its status code, names the stage, and passes on
    its field violations with the stage attached."""

    def __init__(self, stage: str, error: grpc.aio.AioRpcError) -> None:
        self.code = error.code().name
        self.violations = tuple(FieldViolation(v.field, v.value, v.reason, v.stage or stage)
                                for v in violations_from_metadata(error.trailing_metadata()))
        super().__init__(f"{stage}: {error.details()}")


class Deadline:
    """The caller's deadline, handed down to every stage call as its timeout."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(self._end - time.monotonic(), 0.001)


PRIORITY_KEY = "diffmesh-priority"  # gRPC metadata: the caller's priority class, sent on every stage call


@dataclass
class CallContext:
    """What every stage call of one request shares: its routing key, deadline, the caller's
    priority class (sent to every stage as `diffmesh-priority` metadata: the denoiser orders
    batch rows by it) and the timings that become the response's cost."""

    request_id: str
    request_key: str
    deadline: Deadline
    timings: list[common_pb2.StageTiming] = field(default_factory=list)
    priority: str = "interactive"

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The gRPC metadata every stage call of this request carries."""
        return ((PRIORITY_KEY, self.priority),)

    def cost(self) -> common_pb2.RequestCost:
        return common_pb2.RequestCost(
            device_seconds=sum(t.compute_ms for t in self.timings) / 1000.0,
            queue_seconds=sum(t.queue_ms for t in self.timings) / 1000.0,
            bytes_moved=sum(t.bytes_sent + t.bytes_received for t in self.timings))


# invoke(variant, timeout, metadata) -> (response, bytes received)
Invoke = Callable[[str, float, tuple[tuple[str, str], ...]], Awaitable[tuple[Any, int]]]
# Mirrored (shadow) calls are extra work nobody waits for: the stages see them as batch.
SHADOW_METADATA = ((PRIORITY_KEY, "batch"),)


class StageClient:
    stage = ""

    def __init__(self, router: StageRouter, shadow: ShadowDiffer | None, shadow_timeout_s: float) -> None:
        self.router = router
        self.shadow = shadow
        self.shadow_timeout_s = shadow_timeout_s

    async def check_reachable(self, ctx: CallContext, wait_s: float) -> None:
        """UNAVAILABLE naming the stage when neither the variant this request routes to nor
        stable (a failing canary's fallback) has a reachable replica."""
        variant = self.router.choose(self.stage, ctx.request_key)
        for candidate in dict.fromkeys((variant, STABLE)):
            channel = self.router.channel(self.stage, candidate)
            if channel is not None and await reachable(channel, min(wait_s, ctx.deadline.remaining())):
                return
        raise Unavailable(f"stage {self.stage} is unavailable: none of its replicas is reachable; nothing ran "
                          f"(retry with backoff)")

    async def _attempts(self, ctx: CallContext, invoke: Invoke, variant: str) -> tuple[Any, int]:
        for attempt in range(RETRY_ATTEMPTS):
            try:
                return await invoke(variant, ctx.deadline.remaining(), ctx.metadata())
            except grpc.aio.AioRpcError as exc:
                backoff = RETRY_BACKOFF_S * 2**attempt
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == RETRY_ATTEMPTS - 1 \
                        or ctx.deadline.remaining() <= backoff:
                    raise
                metrics.STAGE_RETRIES.labels(self.stage, variant).inc()
                log_event(log, "retrying stage call", logging.WARNING, stage=self.stage, attempt=attempt + 1,
                          error=exc.details())
                await asyncio.sleep(backoff)
        raise AssertionError("unreachable")

    async def _routed(self, ctx: CallContext, invoke: Invoke) -> tuple[str, Any, int]:
        """Runs the call on the variant this request routes to; a failing canary falls back to stable."""
        variant = self.router.choose(self.stage, ctx.request_key)
        try:
            response, received = await self._attempts(ctx, invoke, variant)
        except grpc.aio.AioRpcError as exc:
            metrics.STAGE_CALLS.labels(self.stage, variant, exc.code().name).inc()
            if variant != CANARY or exc.code() not in FALLBACK_CODES:
                raise StageCallError(self.stage, exc) from exc
            metrics.STAGE_FALLBACKS.labels(self.stage).inc()
            log_event(log, "canary failed, falling back to stable", logging.WARNING, stage=self.stage,
                      code=exc.code().name, error=exc.details())
            variant = STABLE
            try:
                response, received = await self._attempts(ctx, invoke, STABLE)
            except grpc.aio.AioRpcError as stable_exc:
                metrics.STAGE_CALLS.labels(self.stage, STABLE, stable_exc.code().name).inc()
                raise StageCallError(self.stage, stable_exc) from stable_exc
        metrics.STAGE_CALLS.labels(self.stage, variant, "OK").inc()
        return variant, response, received

    async def _call(self, ctx: CallContext, label: str, phase: str, request: Any, invoke: Invoke,
                    mirror: Invoke | None = None) -> Any:
        """One stage call under the policy; `label` names it in timings and spans ("vae.decode")."""
        attributes = {"diffmesh.stage": label, "diffmesh.phase": phase}
        with telemetry.tracer().start_as_current_span(f"stage {label}", attributes=attributes) as span:
            start = time.perf_counter()
            variant, response, received = await self._routed(ctx, invoke)
            usage = response.usage
            timing = common_pb2.StageTiming(
                stage=label, wall_ms=elapsed_ms(start), compute_ms=usage.compute_ms, queue_ms=usage.queue_ms,
                variant=usage.variant or variant, bytes_sent=request.ByteSize(), bytes_received=received,
                device=usage.device, instance_id=usage.instance_id, phase=phase, batch_wait_ms=usage.batch_wait_ms)
            ctx.timings.append(timing)
            span.set_attributes({"diffmesh.variant": timing.variant, "diffmesh.device": timing.device,
                                 "diffmesh.compute_ms": timing.compute_ms, "diffmesh.queue_ms": timing.queue_ms,
                                 "diffmesh.payload.bytes_sent": timing.bytes_sent,
                                 "diffmesh.payload.bytes_received": timing.bytes_received})
        if self.shadow is not None and variant == STABLE and self.router.should_shadow(self.stage, ctx.request_key):
            canary = mirror or invoke

            async def shadow_call() -> Any:
                return (await canary(CANARY, self.shadow_timeout_s, SHADOW_METADATA))[0]
            self.shadow.mirror(label, ctx.request_id, shadow_call, response)
        return response

    def _unary_invoke(self, stub_cls: Callable, rpc: str, request: Any) -> Invoke:
        async def invoke(variant: str, timeout: float, metadata: tuple[tuple[str, str], ...]) -> tuple[Any, int]:
            response = await getattr(self.router.stub(self.stage, variant, stub_cls), rpc)(
                request, timeout=timeout, metadata=metadata)
            return response, response.ByteSize()
        return invoke


class TextEncoderClient(StageClient):
    stage = "text_encoder"

    async def encode(self, ctx: CallContext, request: text_encoder_pb2.EncodeTextRequest,
                     phase: str) -> text_encoder_pb2.EncodeTextResponse:
        invoke = self._unary_invoke(text_encoder_pb2_grpc.TextEncoderStub, "Encode", request)
        return await self._call(ctx, "text_encoder", phase, request, invoke)


class VaeClient(StageClient):
    stage = "vae"

    async def decode(self, ctx: CallContext, request: vae_pb2.DecodeRequest, phase: str) -> vae_pb2.DecodeResponse:
        return await self._call(ctx, "vae.decode", phase, request,
                                self._unary_invoke(vae_pb2_grpc.VaeStub, "Decode", request))

    async def encode(self, ctx: CallContext, request: vae_pb2.EncodeImageRequest,
                     phase: str) -> vae_pb2.EncodeImageResponse:
        return await self._call(ctx, "vae.encode", phase, request,
                                self._unary_invoke(vae_pb2_grpc.VaeStub, "Encode", request))


class FaceClient(StageClient):
    stage = "face"

    async def analyze(self, ctx: CallContext, request: face_pb2.AnalyzeRequest, phase: str) -> face_pb2.AnalyzeResponse:
        return await self._call(ctx, "face.analyze", phase, request,
                                self._unary_invoke(face_pb2_grpc.FaceServiceStub, "Analyze", request))

    async def encode_identity(self, ctx: CallContext, request: face_pb2.EncodeIdentityRequest,
                              phase: str) -> face_pb2.EncodeIdentityResponse:
        return await self._call(ctx, "face.encode_identity", phase, request,
                                self._unary_invoke(face_pb2_grpc.FaceServiceStub, "EncodeIdentity", request))


class SafetyClient(StageClient):
    stage = "safety"
    # How long DescribePolicy's answer (whether image checks want faces) is reused: a policy
    # rollout reaches every orchestrator within this.
    POLICY_TTL_S = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._policy: tuple[float, safety_pb2.DescribePolicyResponse] | None = None

    def _invoke(self, rpc: str, request: Any) -> Invoke:
        return self._unary_invoke(safety_pb2_grpc.SafetyServiceStub, rpc, request)

    async def check_prompt(self, ctx: CallContext, request: safety_pb2.CheckPromptRequest,
                           phase: str) -> safety_pb2.CheckPromptResponse:
        return await self._call(ctx, "safety.check_prompt", phase, request, self._invoke("CheckPrompt", request))

    async def check_images(self, ctx: CallContext, request: safety_pb2.CheckImagesRequest,
                           phase: str) -> safety_pb2.CheckImagesResponse:
        return await self._call(ctx, "safety.check_images", phase, request, self._invoke("CheckImages", request))

    async def mark_images(self, ctx: CallContext, request: safety_pb2.MarkImagesRequest,
                          phase: str) -> safety_pb2.MarkImagesResponse:
        return await self._call(ctx, "safety.mark_images", phase, request, self._invoke("MarkImages", request))

    async def release_case(self, ctx: CallContext, request: safety_pb2.ReleaseCaseRequest) -> safety_pb2.ReleaseCaseResponse:
        return await self._call(ctx, "safety.release_case", "review", request, self._invoke("ReleaseCase", request))

    async def describe_policy(self, ctx: CallContext) -> safety_pb2.DescribePolicyResponse:
        """The policy's description, cached for POLICY_TTL_S (not a timed stage call: no usage)."""
        now = time.monotonic()
        if self._policy is not None and now - self._policy[0] < self.POLICY_TTL_S:
            return self._policy[1]
        request = safety_pb2.DescribePolicyRequest()

        async def invoke(variant: str, timeout: float, metadata: tuple[tuple[str, str], ...]) -> tuple[Any, int]:
            stub = self.router.stub(self.stage, variant, safety_pb2_grpc.SafetyServiceStub)
            response = await stub.DescribePolicy(request, timeout=timeout, metadata=metadata)
            return response, response.ByteSize()
        with telemetry.tracer().start_as_current_span("stage safety.describe_policy",
                                                      attributes={"diffmesh.stage": "safety.describe_policy"}) as span:
            variant, response, _received = await self._routed(ctx, invoke)
            span.set_attribute("diffmesh.variant", variant)
        self._policy = (now, response)
        return response


ProgressFn = Callable[[denoiser_pb2.DenoiseProgress], None]


class DenoiserClient(StageClient):
    stage = "denoiser"

    async def denoise(self, ctx: CallContext, request: denoiser_pb2.DenoiseRequest, phase: str,
                      on_progress: ProgressFn | None = None) -> denoiser_pb2.DenoiseResult:
        """The streamed sampling loop: on_progress gets each step once, in order, even when a
        retried call repeats the steps a killed replica had already reported."""
        reported = [0]

        def stream(forward: bool) -> Invoke:
            async def invoke(variant: str, timeout: float,
                             metadata: tuple[tuple[str, str], ...]) -> tuple[denoiser_pb2.DenoiseResult, int]:
                stub = self.router.stub(self.stage, variant, denoiser_pb2_grpc.DenoiserStub)
                call = stub.Denoise(request, timeout=timeout, metadata=metadata)
                received, result = 0, None
                try:
                    async for event in call:
                        received += event.ByteSize()
                        if not event.HasField("progress"):
                            result = event.result
                        elif forward and on_progress is not None and event.progress.step > reported[0]:
                            reported[0] = event.progress.step
                            on_progress(event.progress)
                finally:
                    call.cancel()  # no-op once finished; stops the denoiser when our caller went away
                if result is None:
                    raise MeshError("denoiser: stream ended without a result")
                return result, received
            return invoke

        return await self._call(ctx, "denoiser", phase, request, stream(True), mirror=stream(False))


CLIENTS: Mapping[str, type[StageClient]] = {cls.stage: cls for cls in (TextEncoderClient, DenoiserClient, VaeClient,
                                                                         FaceClient, SafetyClient)}


class StageClients:
    """The typed clients of the configured stages. A stage the table has but this deployment does
    not route (an optional stage left unconfigured) raises FAILED_PRECONDITION when a request
    needs it; everything else keeps working."""

    def __init__(self, routes: list[StageRoute], max_message_mb: int,
                 credentials: grpc.ChannelCredentials | None = None, shadow: ShadowDiffer | None = None,
                 shadow_timeout_s: float = 300.0, clients: Mapping[str, type[StageClient]] = CLIENTS) -> None:
        configured = [route for route in routes if route.stable]
        self.router = StageRouter(configured, max_message_mb, credentials)
        self.shadow = shadow
        self._clients = {route.stage: clients[route.stage](self.router, shadow, shadow_timeout_s)
                         for route in configured}
        for route in configured:
            metrics.preinitialize_stage_calls(route.stage, [STABLE, CANARY] if route.canary else [STABLE])

    def require(self, stage: str) -> StageClient:
        client = self._clients.get(stage)
        if client is None:
            raise FailedPrecondition(f"stage {stage} is not configured in this deployment "
                                     f"(set {stage}_address on the orchestrator); this request needs it")
        return client

    async def check_reachable(self, stages: list[str], ctx: CallContext, wait_s: float) -> None:
        """Before a flow: each stage it needs has a reachable replica (see StageClient)."""
        for stage in stages:
            await self.require(stage).check_reachable(ctx, wait_s)

    @property
    def text_encoder(self) -> TextEncoderClient:
        return self.require("text_encoder")  # type: ignore[return-value]

    @property
    def denoiser(self) -> DenoiserClient:
        return self.require("denoiser")  # type: ignore[return-value]

    @property
    def vae(self) -> VaeClient:
        return self.require("vae")  # type: ignore[return-value]

    @property
    def face(self) -> FaceClient:
        return self.require("face")  # type: ignore[return-value]

    @property
    def safety(self) -> SafetyClient:
        return self.require("safety")  # type: ignore[return-value]

    def configured(self, stage: str) -> bool:
        return stage in self._clients

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Finalize: let in-flight shadow calls finish (bounded), then close every channel."""
        if self.shadow is not None:
            try:
                await asyncio.wait_for(self.shadow.drain(), drain_timeout_s)
            except asyncio.TimeoutError:
                log_event(log, "shadow calls still running at shutdown", logging.WARNING)
        await self.router.close()
