"""Denoiser gRPC servicer: messages -> DenoiseJob, progress events <- the loop. Nothing more.

One call is one job. What only the wire can get wrong (tensor dtypes, ranks and byte lengths,
generator state bytes, scheduler names, a missing prompt_embeds) is checked here; everything a
job can get wrong against the model or the serving limits is checked once, by the compute's
check_job.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from typing import AsyncIterator

import grpc
import torch

from diffmesh.imaging import encode_image
from diffmesh.models.latent_space import generators_from_states, seeded_generators
from diffmesh.models.schedulers import lookup_scheduler, require_scheduler
from diffmesh.proto.v1 import common_pb2, denoiser_pb2, denoiser_pb2_grpc, tensor_pb2
from diffmesh.runtime import codec, metrics, telemetry
from diffmesh.errors import Cancelled, InvalidArgument
from diffmesh.limits import MAX_FEATHER
from diffmesh.runtime.logs import elapsed_ms, log_event
from diffmesh.runtime.server import Admission
from diffmesh.runtime.telemetry import annotate
from services.denoiser.masks import change_map_from_grey, change_map_from_mask
from diffmesh.runtime.admission import PRIORITIES
from diffmesh.runtime.batching import SharedCalls
from services.denoiser.sampler import Conditioning, DenoiseJob, JobLimits, UNetDenoiser

_FLOATS = codec.FLOAT_DTYPES
_DONE = object()
PREVIEW_QUALITY = 70
log = logging.getLogger("diffmesh.denoiser")


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a cancelled loop's Cancelled is expected, not an error


def _float_tensor(request: denoiser_pb2.DenoiseRequest, name: str) -> torch.Tensor:
    """A float input: finite and non-empty (a NaN embedding would denoise to an all-NaN image
    and come back as success)."""
    return codec.to_torch(getattr(request, name), name, dtypes=_FLOATS, finite=True, nonempty=True)


def _optional_tensor(request: denoiser_pb2.DenoiseRequest, name: str) -> torch.Tensor | None:
    return _float_tensor(request, name) if request.HasField(name) else None


def request_priority(context: grpc.aio.ServicerContext) -> str:
    """The caller's priority class, as the orchestrator's caller admission sends it
    (`diffmesh-priority` metadata); absent: interactive (a direct caller is someone waiting)."""
    for key, value in context.invocation_metadata() or ():
        if key == "diffmesh-priority":
            if value not in PRIORITIES:
                raise InvalidArgument("diffmesh-priority", value, f"must be one of {', '.join(PRIORITIES)}")
            return value
    return "interactive"


def _generators(request: denoiser_pb2.DenoiseRequest) -> list[torch.Generator]:
    if not request.HasField("generator_states"):
        return seeded_generators(request.seeds)
    states = codec.to_torch(request.generator_states, "generator_states", dtypes=(tensor_pb2.UINT8,), rank=2)
    try:
        return generators_from_states(states)
    except RuntimeError as exc:
        raise InvalidArgument("generator_states", list(states.shape), f"not a CPU generator state: {exc}")


def job_from_request(request: denoiser_pb2.DenoiseRequest, limits: JobLimits = JobLimits()) -> DenoiseJob:
    """The request as a job; only wire-format checks here (UNetDenoiser.check_job does the rest,
    against `limits`; the size is checked here too when a change map is to be built at it)."""
    spec = require_scheduler(request.scheduler)
    if not request.HasField("prompt_embeds"):
        raise InvalidArgument("prompt_embeds", None, "required")
    init_latents = _optional_tensor(request, "init_latents")
    merged = _optional_tensor(request, "merged_prompt_embeds")
    if merged is None and request.start_merge_step != 0:
        # Without merged conditioning there is nothing to merge: a set step would be ignored silently.
        raise InvalidArgument("start_merge_step", request.start_merge_step, "given without merged_prompt_embeds")
    change_map = None
    if request.HasField("change_map"):
        grey = codec.to_torch(request.change_map, "change_map", dtypes=(tensor_pb2.UINT8,), rank=3, nonempty=True)
        # Checked before the map is blurred or scaled (that work grows with its pixels): one grey
        # image per image, or one for all, at the request's size, within max_size.
        for name in ("width", "height"):
            if limits.max_size is not None and getattr(request, name) > limits.max_size:
                raise InvalidArgument(name, getattr(request, name), f"at most {limits.max_size} pixels")
        if tuple(grey.shape[1:]) != (request.height, request.width):
            raise InvalidArgument("change_map.shape", list(grey.shape),
                                  f"expected [1 or n, {request.height}, {request.width}] (the image size)")
        if not math.isfinite(request.mask_feather) or not 0.0 <= request.mask_feather <= MAX_FEATHER:
            raise InvalidArgument("mask_feather", request.mask_feather, f"must be in [0, {MAX_FEATHER:g}] pixels")
        change_map = (change_map_from_mask(grey, request.mask_feather) if request.change_map_is_mask
                      else change_map_from_grey(grey))
    return DenoiseJob(
        scheduler=spec, steps=request.steps, guidance_scale=request.guidance_scale,
        width=request.width, height=request.height,
        conditioning=Conditioning(
            prompt_embeds=_float_tensor(request, "prompt_embeds"),
            negative_prompt_embeds=_optional_tensor(request, "negative_prompt_embeds"),
            pooled_prompt_embeds=_optional_tensor(request, "pooled_prompt_embeds"),
            negative_pooled_prompt_embeds=_optional_tensor(request, "negative_pooled_prompt_embeds"),
            merged_prompt_embeds=merged,
            merged_pooled_prompt_embeds=_optional_tensor(request, "merged_pooled_prompt_embeds"),
        ),
        generators=_generators(request),
        init_latents=init_latents,
        strength=request.strength if init_latents is not None else 1.0,
        timesteps=list(request.timesteps) or None, timestep_spacing=request.timestep_spacing or None,
        sigma_schedule=request.sigma_schedule or None, guidance_rescale=request.guidance_rescale,
        change_map=change_map, preview_every=request.preview_every,
        start_merge_step=request.start_merge_step, adapters=tuple(request.adapters),
    )


def batch_attributes(shared: SharedCalls, max_rows: int) -> dict[str, object]:
    """The sampling span's record of the UNet calls it ran in (one entry per call, in order):
    attributes, not a span per step."""
    return {"diffmesh.batch.calls": shared.calls, "diffmesh.batch.rows": list(shared.rows),
            "diffmesh.batch.requests": list(shared.requests), "diffmesh.batch.max_rows": max_rows,
            "diffmesh.batch.wait_ms": round(shared.wait_ms, 3), "diffmesh.batch.device_ms": round(shared.device_ms, 3)}


class DenoiserServicer(denoiser_pb2_grpc.DenoiserServicer):
    def __init__(self, models, admission: Admission, max_steps: int, max_batch: int,
                 scheduler_override: str = "", max_size: int | None = None, max_sequence: int | None = None) -> None:
        self._scheduler_override = scheduler_override
        self._models = models
        self._admission = admission
        # diffmesh.limits: the orchestrator's bounds, checked again here with the job.
        self._limits = JobLimits(max_steps=max_steps, max_batch=max_batch, max_size=max_size,
                                 max_sequence=max_sequence)

    async def Denoise(self, request: denoiser_pb2.DenoiseRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[denoiser_pb2.DenoiseEvent]:
        model: UNetDenoiser = self._models.get(request.model_id)
        job = job_from_request(request, self._limits)
        if self._scheduler_override:
            job.scheduler = lookup_scheduler(self._scheduler_override)
        prepared = model.check_job(job, self._limits)  # reject before queueing, not after the wait
        priority = request_priority(context)
        attributes = {"diffmesh.model": request.model_id, "diffmesh.scheduler": request.scheduler,
                      "diffmesh.steps": request.steps, "diffmesh.size": f"{request.width}x{request.height}",
                      "diffmesh.batch_size": job.count, "diffmesh.img2img": job.init_latents is not None,
                      "diffmesh.identity_merge": job.conditioning.merges, "diffmesh.adapters": ",".join(job.adapters),
                      "diffmesh.priority": priority}
        annotate(**attributes)
        metrics.BATCH_SIZE.labels("denoiser").observe(job.count)
        async with self._admission.slot(priority) as usage:
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            cancel = threading.Event()
            start = time.perf_counter()
            steps_done = metrics.DENOISE_STEPS.labels(request.model_id)
            shared = SharedCalls()
            in_batcher = metrics.BATCH_REQUESTS.labels(request.model_id)

            def run() -> torch.Tensor:
                counted, pending = [0], [None]
                with telemetry.tracer().start_as_current_span("sampling_loop", attributes=attributes) as span:
                    def on_step(_job: int, step: int, total: int, timestep: float) -> None:
                        counted[0] = step
                        span.add_event("step", {"step": step, "timestep": timestep})
                        steps_done.inc()
                        progress = denoiser_pb2.DenoiseProgress(step=step, total_steps=total, timestep=timestep,
                                                                elapsed_ms=elapsed_ms(start))
                        if request.quiet:
                            return
                        if job.preview_every and step % job.preview_every == 0:
                            pending[0] = progress  # sent by on_preview, with the previews
                        else:
                            loop.call_soon_threadsafe(events.put_nowait, progress)

                    def on_preview(_job: int, step: int, total: int, images) -> None:
                        progress = pending[0]
                        progress.previews.extend(encode_image(image, common_pb2.JPEG, PREVIEW_QUALITY)
                                                 for image in images)
                        loop.call_soon_threadsafe(events.put_nowait, progress)

                    try:
                        loop_start = time.perf_counter()
                        in_batcher.inc()
                        try:
                            [latents] = model.denoise([prepared], on_step, cancel, on_preview, priority, shared)
                        finally:
                            in_batcher.dec()
                        rate = counted[0] / max(time.perf_counter() - loop_start, 1e-9)
                        metrics.DENOISE_STEP_RATE.labels(request.model_id).set(rate)
                        return latents
                    except Cancelled as exc:
                        log_event(log, "denoise cancelled", model=request.model_id, detail=str(exc))
                        raise
                    finally:
                        span.set_attributes(batch_attributes(shared, model.batcher.policy.max_rows))
                        loop.call_soon_threadsafe(events.put_nowait, _DONE)

            future = self._admission.submit(usage, run)
            try:
                while (event := await events.get()) is not _DONE:
                    yield denoiser_pb2.DenoiseEvent(progress=event)
                latents = await future
            finally:
                # The caller cancelled or went away: stop the loop at its next step (its outcome
                # is then logged, not returned).
                cancel.set()
                future.add_done_callback(_consume)
            usage.share(shared)
            result = denoiser_pb2.DenoiseResult(latents=codec.from_torch(latents), usage=self._admission.report(usage))
            yield denoiser_pb2.DenoiseEvent(result=result)
