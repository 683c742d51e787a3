"""Runs a GenerationPlan through the stages and yields progress, then the response.

txt2img:  text_encoder -> denoiser -> vae.decode
img2img:  text_encoder, vae.encode (together) -> denoiser (continuing each image's random
          stream from vae.encode) -> vae.decode

Every stage call gets its own span (with the variant that served it) around the gRPC client
span, and a StageTiming with its wall time, the stage's reported compute and queue time, and the
bytes moved each way: the request's cost.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import grpc

from diffmesh.proto.v1 import (common_pb2, denoiser_pb2, denoiser_pb2_grpc, orchestrator_pb2, text_encoder_pb2,
                               text_encoder_pb2_grpc, vae_pb2, vae_pb2_grpc)
from diffmesh.runtime import codec, metrics, telemetry
from diffmesh.errors import MeshError
from diffmesh.runtime.logs import elapsed_ms, log_event
from services.orchestrator.plan import GenerationPlan
from services.orchestrator.routing import CANARY, STABLE, StageRouter
from services.orchestrator.shadow import ShadowDiffer

T = TypeVar("T")
log = logging.getLogger("diffmesh.orchestrator")


class StageCallError(MeshError):
    """A downstream stage failed: keeps its status code, names the stage."""

    def __init__(self, stage: str, error: grpc.aio.AioRpcError) -> None:
        self.code = error.code().name
        super().__init__(f"{stage}: {error.details()}")


class Deadline:
    """The caller's deadline, handed down to every stage call as its timeout."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(self._end - time.monotonic(), 0.001)


def _timing(stage: str, variant: str, start: float, usage: common_pb2.StageUsage, sent: int,
            received: int) -> common_pb2.StageTiming:
    return common_pb2.StageTiming(stage=stage, wall_ms=elapsed_ms(start), compute_ms=usage.compute_ms,
                                  queue_ms=usage.queue_ms, variant=usage.variant or variant, bytes_sent=sent,
                                  bytes_received=received, device=usage.device, instance_id=usage.instance_id)


# A canary that fails for these reasons is the canary's problem: the call goes to stable instead.
FALLBACK_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                  grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED}
RETRY_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.05


class Generation:
    def __init__(self, plan: GenerationPlan, router: StageRouter, deadline: Deadline, request_key: str,
                 shadow: ShadowDiffer | None = None, shadow_timeout_s: float = 300.0,
                 progress: bool = True) -> None:
        self.progress = progress  # unary Generate needs no per-step events from the denoiser
        self.plan = plan
        self.router = router
        self.deadline = deadline
        self.key = request_key
        self.shadow = shadow
        self.shadow_timeout_s = shadow_timeout_s
        self.timings: list[common_pb2.StageTiming] = []

    def _record(self, timing: common_pb2.StageTiming, span: Any) -> None:
        self.timings.append(timing)
        span.set_attributes({"diffmesh.variant": timing.variant, "diffmesh.device": timing.device,
                             "diffmesh.compute_ms": timing.compute_ms, "diffmesh.queue_ms": timing.queue_ms,
                             "diffmesh.payload.bytes_sent": timing.bytes_sent,
                             "diffmesh.payload.bytes_received": timing.bytes_received})

    async def _attempts(self, invoke: Callable[[], Awaitable[T]]) -> T:
        """Retries a call that found its replica UNAVAILABLE (killed, draining, restarting): stage
        calls are idempotent (seeded), and round_robin sends the next attempt to another replica."""
        for attempt in range(RETRY_ATTEMPTS):
            try:
                return await invoke()
            except grpc.aio.AioRpcError as exc:
                backoff = RETRY_BACKOFF_S * 2**attempt
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == RETRY_ATTEMPTS - 1 \
                        or self.deadline.remaining() <= backoff:
                    raise
                log_event(log, "retrying stage call", logging.WARNING, attempt=attempt + 1, error=exc.details())
                await asyncio.sleep(backoff)
        raise AssertionError("unreachable")

    async def _routed(self, route: str, stage: str, invoke: Callable[[str], Awaitable[T]]) -> tuple[str, T]:
        """Runs the call on the variant this request routes to; a failing canary falls back to stable."""
        variant = self.router.choose(route, self.key)
        try:
            result = await self._attempts(lambda: invoke(variant))
        except grpc.aio.AioRpcError as exc:
            metrics.STAGE_CALLS.labels(route, variant, exc.code().name).inc()
            if variant != CANARY or exc.code() not in FALLBACK_CODES:
                raise StageCallError(stage, exc) from exc
            metrics.STAGE_FALLBACKS.labels(route).inc()
            log_event(log, "canary failed, falling back to stable", logging.WARNING, stage=stage,
                      code=exc.code().name, error=exc.details())
            variant = STABLE
            try:
                result = await self._attempts(lambda: invoke(STABLE))
            except grpc.aio.AioRpcError as stable_exc:
                metrics.STAGE_CALLS.labels(route, STABLE, stable_exc.code().name).inc()
                raise StageCallError(stage, stable_exc) from stable_exc
        metrics.STAGE_CALLS.labels(route, variant, "OK").inc()
        return variant, result

    def _mirror(self, route: str, stage: str, variant: str, invoke: Callable[[str, float], Awaitable[Any]],
                stable: Any) -> None:
        if self.shadow is not None and variant == STABLE and self.router.should_shadow(route, self.key):
            self.shadow.mirror(stage, self.plan.request_id, lambda: invoke(CANARY, self.shadow_timeout_s), stable)

    async def _unary(self, stage: str, route: str, stub_cls: Callable, method: str, request: Any) -> Any:
        def invoke(variant: str, timeout: float | None = None) -> Awaitable[Any]:
            stub = self.router.stub(route, variant, stub_cls)
            return getattr(stub, method)(request, timeout=timeout or self.deadline.remaining())

        with telemetry.tracer().start_as_current_span(f"stage {stage}", attributes={"diffmesh.stage": stage}) as span:
            start = time.perf_counter()
            variant, response = await self._routed(route, stage, invoke)
            self._record(_timing(stage, variant, start, response.usage, request.ByteSize(), response.ByteSize()), span)
        self._mirror(route, stage, variant, invoke, response)
        return response

    async def encode_text(self) -> text_encoder_pb2.EncodeTextResponse:
        plan = self.plan
        request = text_encoder_pb2.EncodeTextRequest(model_id=plan.model.entry.id, prompt=plan.prompt,
                                                     with_negative=plan.guided, literal_prompt=plan.literal_prompt)
        for name in ("negative_prompt", "prompt_2", "negative_prompt_2", "clip_skip"):
            if getattr(plan, name) is not None:
                setattr(request, name, getattr(plan, name))
        return await self._unary("text_encoder", "text_encoder", text_encoder_pb2_grpc.TextEncoderStub, "Encode",
                                 request)

    async def encode_image(self) -> vae_pb2.EncodeImageResponse:
        plan = self.plan
        request = vae_pb2.EncodeImageRequest(
            model_id=plan.model.entry.id, pixels=codec.from_numpy(plan.init_pixels),
            width=plan.width, height=plan.height, sampling=vae_pb2.SAMPLE, seeds=plan.seeds)
        return await self._unary("vae.encode", "vae", vae_pb2_grpc.VaeStub, "Encode", request)

    def denoise_request(self, text: text_encoder_pb2.EncodeTextResponse,
                        image: vae_pb2.EncodeImageResponse | None) -> denoiser_pb2.DenoiseRequest:
        plan = self.plan
        request = denoiser_pb2.DenoiseRequest(
            model_id=plan.model.entry.id, scheduler=plan.scheduler, steps=plan.steps,
            guidance_scale=plan.guidance_scale, width=plan.width, height=plan.height, seeds=plan.seeds,
            timesteps=plan.timesteps or [], timestep_spacing=plan.timestep_spacing,
            sigma_schedule=plan.sigma_schedule, guidance_rescale=plan.guidance_rescale,
            preview_every=plan.preview_every if self.progress else 0, quiet=not self.progress)
        if plan.change_map is not None:
            request.change_map.CopyFrom(codec.from_numpy(plan.change_map))
            request.change_map_is_mask = plan.change_map_is_mask
            request.mask_feather = plan.mask_feather
        for name in ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                     "negative_pooled_prompt_embeds"):
            if text.HasField(name):
                getattr(request, name).CopyFrom(getattr(text, name))
        if image is not None:
            request.init_latents.CopyFrom(image.latents)
            request.generator_states.CopyFrom(image.generator_states)
            request.strength = plan.strength
        return request

    async def denoise(self, request: denoiser_pb2.DenoiseRequest,
                      start: float) -> AsyncIterator[orchestrator_pb2.GenerateEvent | denoiser_pb2.DenoiseResult]:
        """Yields progress events as they arrive, then the denoiser's result."""
        progress: asyncio.Queue = asyncio.Queue()
        reported = [0]

        async def invoke(variant: str, timeout: float | None = None,
                         forward: bool = True) -> tuple[denoiser_pb2.DenoiseResult, int]:
            stub = self.router.stub("denoiser", variant, denoiser_pb2_grpc.DenoiserStub)
            call = stub.Denoise(request, timeout=timeout or self.deadline.remaining())
            received, result = 0, None
            try:
                async for event in call:
                    received += event.ByteSize()
                    if not event.HasField("progress"):
                        result = event.result
                    elif forward and event.progress.step > reported[0]:  # a retried call repeats steps
                        reported[0] = event.progress.step
                        progress.put_nowait(orchestrator_pb2.GenerateEvent(progress=orchestrator_pb2.StepProgress(
                            step=event.progress.step, total_steps=event.progress.total_steps,
                            elapsed_ms=elapsed_ms(start), previews=event.progress.previews)))
            finally:
                call.cancel()  # no-op once finished; stops the denoiser when our caller went away
            if result is None:
                raise MeshError("denoiser: stream ended without a result")
            return result, received

        with telemetry.tracer().start_as_current_span("stage denoiser", attributes={"diffmesh.stage": "denoiser"}) as span:
            call_start = time.perf_counter()
            task = asyncio.ensure_future(self._routed("denoiser", "denoiser", invoke))
            try:
                while True:
                    getter = asyncio.ensure_future(progress.get())
                    done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                    if getter not in done:
                        getter.cancel()
                        break
                    yield getter.result()
                while not progress.empty():
                    yield progress.get_nowait()
                variant, (result, received) = await task
            finally:
                task.cancel()
            self._record(_timing("denoiser", variant, call_start, result.usage, request.ByteSize(), received), span)

        async def shadow_invoke(variant: str, timeout: float) -> denoiser_pb2.DenoiseResult:
            return (await invoke(variant, timeout, forward=False))[0]

        self._mirror("denoiser", "denoiser", variant, shadow_invoke, result)
        yield result

    def cost(self) -> common_pb2.RequestCost:
        return common_pb2.RequestCost(
            device_seconds=sum(t.compute_ms for t in self.timings) / 1000.0,
            queue_seconds=sum(t.queue_ms for t in self.timings) / 1000.0,
            bytes_moved=sum(t.bytes_sent + t.bytes_received for t in self.timings))

    async def run(self) -> AsyncIterator[orchestrator_pb2.GenerateEvent]:
        plan = self.plan
        start = time.perf_counter()
        if plan.is_img2img:
            text, image = await asyncio.gather(self.encode_text(), self.encode_image())
        else:
            text, image = await self.encode_text(), None

        result = None
        async for item in self.denoise(self.denoise_request(text, image), start):
            if isinstance(item, denoiser_pb2.DenoiseResult):
                result = item
            else:
                yield item

        decode = vae_pb2.DecodeRequest(model_id=plan.model.entry.id, latents=result.latents,
                                       format=plan.output_format, quality=plan.quality)
        if plan.keep_mask is not None:
            decode.paste_pixels.CopyFrom(codec.from_numpy(plan.paste_pixels))
            decode.keep_mask.CopyFrom(codec.from_numpy(plan.keep_mask))
        decoded = await self._unary("vae.decode", "vae", vae_pb2_grpc.VaeStub, "Decode", decode)
        cost = self.cost()
        telemetry.annotate(**{"diffmesh.cost.device_seconds": cost.device_seconds,
                              "diffmesh.cost.queue_seconds": cost.queue_seconds,
                              "diffmesh.cost.bytes_moved": cost.bytes_moved})
        info = orchestrator_pb2.GenerationInfo(
            request_id=plan.request_id, model=plan.model.entry.id, scheduler=plan.scheduler, steps=plan.steps,
            guidance_scale=plan.guidance_scale, strength=plan.strength, width=plan.width, height=plan.height,
            timings=self.timings, total_ms=elapsed_ms(start), cost=cost, trace_id=telemetry.sampled_trace_id() or "")
        images = [orchestrator_pb2.GeneratedImage(image=file, seed=seed, index=i)
                  for i, (file, seed) in enumerate(zip(decoded.images, plan.seeds))]
        yield orchestrator_pb2.GenerateEvent(result=orchestrator_pb2.GenerateResponse(images=images, info=info))
