"""Runs a GenerationPlan through the stages and yields progress, then the response.

txt2img:  text_encoder -> denoiser -> vae.decode
img2img:  text_encoder, vae.encode (together) -> denoiser (continuing each image's random
          stream from vae.encode) -> vae.decode
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import grpc

from diffmesh.proto.v1 import (common_pb2, denoiser_pb2, denoiser_pb2_grpc, orchestrator_pb2, text_encoder_pb2,
                               text_encoder_pb2_grpc, vae_pb2, vae_pb2_grpc)
from diffmesh.runtime import codec
from diffmesh.runtime.errors import MeshError
from diffmesh.runtime.logs import elapsed_ms
from services.orchestrator.plan import GenerationPlan
from services.orchestrator.routing import StageRouter

T = TypeVar("T")


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


class Generation:
    def __init__(self, plan: GenerationPlan, router: StageRouter, deadline: Deadline, request_key: str) -> None:
        self.plan = plan
        self.router = router
        self.deadline = deadline
        self.key = request_key
        self.timings: list[common_pb2.StageTiming] = []

    async def _timed(self, stage: str, variant: str, call: Callable[[], Awaitable[T]],
                     compute_ms: Callable[[T], float]) -> T:
        start = time.perf_counter()
        try:
            result = await call()
        except grpc.aio.AioRpcError as exc:
            raise StageCallError(stage, exc) from exc
        self.timings.append(common_pb2.StageTiming(stage=stage, wall_ms=elapsed_ms(start),
                                                   compute_ms=compute_ms(result), variant=variant))
        return result

    async def encode_text(self) -> text_encoder_pb2.EncodeTextResponse:
        plan = self.plan
        variant, stub = self.router.stub("text_encoder", self.key, text_encoder_pb2_grpc.TextEncoderStub)
        request = text_encoder_pb2.EncodeTextRequest(model_id=plan.model.entry.id, prompt=plan.prompt,
                                                     with_negative=plan.guided)
        if plan.negative_prompt is not None:
            request.negative_prompt = plan.negative_prompt
        return await self._timed("text_encoder", variant,
                                 lambda: stub.Encode(request, timeout=self.deadline.remaining()),
                                 lambda r: r.compute_ms)

    async def encode_image(self) -> vae_pb2.EncodeImageResponse:
        plan = self.plan
        variant, stub = self.router.stub("vae", self.key, vae_pb2_grpc.VaeStub)
        request = vae_pb2.EncodeImageRequest(
            model_id=plan.model.entry.id, pixels=codec.from_numpy(plan.init_pixels),
            width=plan.width, height=plan.height, sampling=vae_pb2.SAMPLE, seeds=plan.seeds)
        return await self._timed("vae.encode", variant,
                                 lambda: stub.Encode(request, timeout=self.deadline.remaining()),
                                 lambda r: r.compute_ms)

    def denoise_request(self, text: text_encoder_pb2.EncodeTextResponse,
                        image: vae_pb2.EncodeImageResponse | None) -> denoiser_pb2.DenoiseRequest:
        plan = self.plan
        request = denoiser_pb2.DenoiseRequest(
            model_id=plan.model.entry.id, scheduler=plan.scheduler, steps=plan.steps,
            guidance_scale=plan.guidance_scale, width=plan.width, height=plan.height, seeds=plan.seeds)
        for name in ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                     "negative_pooled_prompt_embeds"):
            if text.HasField(name):
                getattr(request, name).CopyFrom(getattr(text, name))
        if image is not None:
            request.init_latents.CopyFrom(image.latents)
            request.generator_states.CopyFrom(image.generator_states)
            request.strength = plan.strength
        return request

    async def run(self) -> AsyncIterator[orchestrator_pb2.GenerateEvent]:
        plan = self.plan
        start = time.perf_counter()
        if plan.is_img2img:
            text, image = await asyncio.gather(self.encode_text(), self.encode_image())
        else:
            text, image = await self.encode_text(), None

        variant, stub = self.router.stub("denoiser", self.key, denoiser_pb2_grpc.DenoiserStub)
        call = stub.Denoise(self.denoise_request(text, image), timeout=self.deadline.remaining())
        denoise_start = time.perf_counter()
        result = None
        try:
            async for event in call:
                if event.HasField("progress"):
                    p = event.progress
                    yield orchestrator_pb2.GenerateEvent(progress=orchestrator_pb2.StepProgress(
                        step=p.step, total_steps=p.total_steps, elapsed_ms=elapsed_ms(start)))
                else:
                    result = event.result
        except grpc.aio.AioRpcError as exc:
            raise StageCallError("denoiser", exc) from exc
        finally:
            call.cancel()  # no-op once finished; stops the denoiser when our caller went away
        if result is None:
            raise MeshError("denoiser: stream ended without a result")
        self.timings.append(common_pb2.StageTiming(stage="denoiser", wall_ms=elapsed_ms(denoise_start),
                                                   compute_ms=result.compute_ms, variant=variant))

        variant, vae = self.router.stub("vae", self.key, vae_pb2_grpc.VaeStub)
        decode_request = vae_pb2.DecodeRequest(model_id=plan.model.entry.id, latents=result.latents,
                                               format=plan.output_format, quality=plan.quality)
        decoded = await self._timed("vae.decode", variant,
                                    lambda: vae.Decode(decode_request, timeout=self.deadline.remaining()),
                                    lambda r: r.compute_ms)
        info = orchestrator_pb2.GenerationInfo(
            request_id=plan.request_id, model=plan.model.entry.id, scheduler=plan.scheduler, steps=plan.steps,
            guidance_scale=plan.guidance_scale, strength=plan.strength, width=plan.width, height=plan.height,
            timings=self.timings, total_ms=elapsed_ms(start))
        images = [orchestrator_pb2.GeneratedImage(image=file, seed=seed, index=i)
                  for i, (file, seed) in enumerate(zip(decoded.images, plan.seeds))]
        yield orchestrator_pb2.GenerateEvent(result=orchestrator_pb2.GenerateResponse(images=images, info=info))
