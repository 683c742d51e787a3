"""The orchestrator's work as declared steps over one request state.

A step names the state fields it reads and writes and the stages it calls; a flow is a list of
steps, chosen from which request fields are set (`choose_flow`). A step may plan further work
from what an earlier step returned: `run` may return steps, which run next (the face flow plans
one sub-job per detected face this way). Before any stage works, `require_stages` checks that
every stage the flow needs is configured (FAILED_PRECONDITION) and that a replica of it is
reachable (UNAVAILABLE naming it, so an outage of the last stage does not first run the others).
`complete` runs a flow to its response (unary Generate); `run_flow` runs it as a stream: progress
events as they arrive, then each image in chunks, then the info.

Clean ends: however a request ends (its caller cancels, its deadline passes, the caller
disconnects, a send fails), the steps' task and the progress getter are cancelled and awaited
before the call returns, so no task outlives its request, no span is ended late in another
request's context, and nothing is left pending when the process stops.

    txt2img:  encode_prompt -> denoise -> decode
    img2img:  (encode_prompt | encode_init_image) -> denoise -> decode
    inpaint:  img2img's steps; denoise with progressive masks from the change map, decode with
              paste-back of the kept pixels

(stage 1 of the served flows: services.orchestrator.flows adds the safety steps around them and
the face steps after them).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, fields
from typing import Any, AsyncIterator, Sequence

import numpy as np

from diffmesh.proto.v1 import common_pb2, denoiser_pb2, orchestrator_pb2, text_encoder_pb2, vae_pb2
from diffmesh.runtime import codec, metrics, telemetry
from diffmesh.runtime.logs import elapsed_ms
from services.orchestrator.clients import CallContext, StageClients
from services.orchestrator.plan import GenerationPlan
from services.orchestrator.replies import MIB, image_chunks

BASE = "base"  # the phase of a flow with one denoising pass


@dataclass
class RequestState:
    """Everything one request's steps read and write, by name."""

    plan: GenerationPlan
    text: text_encoder_pb2.EncodeTextResponse | None = None
    init_latents: vae_pb2.EncodeImageResponse | None = None
    latents: denoiser_pb2.DenoiseResult | None = None
    pixels: np.ndarray | None = None              # uint8 [n, H, W, 3]
    files: list[common_pb2.EncodedImage] | None = None
    # Face detailing (face_steps): the references' identity and stage 2's planned work.
    references: Any = None                        # face_steps.ReferenceIdentity
    face_work: Any = None                         # face_steps.FaceWork
    safety: Any = None                            # safety_steps.SafetyState
    halted: bool = False                          # a step ended the flow early (a blocked prompt)

    def require(self, name: str) -> Any:
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(f"step input {name!r} was never written (flow declaration bug)")
        return value


STATE_FIELDS = frozenset(f.name for f in fields(RequestState))


@dataclass
class FlowRun:
    """What the steps of one request share besides the state: the stage clients, the call
    context, where progress goes, and the stream settings."""

    clients: StageClients
    call: CallContext
    progress: bool                          # stream per-step progress (GenerateStream) or not
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: float = field(default_factory=time.perf_counter)
    stream_chunk_bytes: int = 3 * MIB       # file bytes per image event of a stream
    readiness_wait_s: float = 1.0           # how long a stage's connection may take to come up


class Step:
    name = ""
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    stages: tuple[str, ...] = ()
    phase = BASE

    async def run(self, state: RequestState, run: FlowRun) -> Sequence[Step] | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class Together(Step):
    """Steps that share no data, run concurrently (text encoding beside vae.encode)."""

    def __init__(self, *steps: Step) -> None:
        self.steps = steps
        self.name = " | ".join(step.name for step in steps)
        self.reads = tuple(name for step in steps for name in step.reads)
        self.writes = tuple(name for step in steps for name in step.writes)
        self.stages = tuple(stage for step in steps for stage in step.stages)

    async def run(self, state: RequestState, run: FlowRun) -> Sequence[Step] | None:
        planned = await asyncio.gather(*(step.run(state, run) for step in self.steps))
        return [step for more in planned if more for step in more]


class EncodePrompt(Step):
    name, reads, writes, stages = "encode_prompt", ("plan",), ("text",), ("text_encoder",)

    async def run(self, state: RequestState, run: FlowRun) -> None:
        plan = state.plan
        request = text_encoder_pb2.EncodeTextRequest(model_id=plan.model.entry.id, prompt=plan.prompt,
                                                     with_negative=plan.guided, literal_prompt=plan.literal_prompt)
        for name in ("negative_prompt", "prompt_2", "negative_prompt_2", "clip_skip"):
            if getattr(plan, name) is not None:
                setattr(request, name, getattr(plan, name))
        state.text = await run.clients.text_encoder.encode(run.call, request, self.phase)


class EncodeInitImage(Step):
    name, reads, writes, stages = "encode_init_image", ("plan",), ("init_latents",), ("vae",)

    async def run(self, state: RequestState, run: FlowRun) -> None:
        plan = state.plan
        request = vae_pb2.EncodeImageRequest(
            model_id=plan.model.entry.id, pixels=codec.from_numpy(plan.init_pixels),
            width=plan.width, height=plan.height, sampling=vae_pb2.SAMPLE, seeds=plan.seeds)
        state.init_latents = await run.clients.vae.encode(run.call, request, self.phase)


def denoise_request(plan: GenerationPlan, text: text_encoder_pb2.EncodeTextResponse,
                    image: vae_pb2.EncodeImageResponse | None, progress: bool) -> denoiser_pb2.DenoiseRequest:
    request = denoiser_pb2.DenoiseRequest(
        model_id=plan.model.entry.id, scheduler=plan.scheduler, steps=plan.steps,
        guidance_scale=plan.guidance_scale, width=plan.width, height=plan.height, seeds=plan.seeds,
        timesteps=plan.timesteps or [], timestep_spacing=plan.timestep_spacing,
        sigma_schedule=plan.sigma_schedule, guidance_rescale=plan.guidance_rescale,
        preview_every=plan.preview_every if progress else 0, quiet=not progress)
    if plan.change_map is not None:
        request.change_map.CopyFrom(codec.from_numpy(plan.change_map))
        request.change_map_is_mask = plan.change_map_is_mask
        request.mask_feather = plan.mask_feather
    for name in ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"):
        if text.HasField(name):
            getattr(request, name).CopyFrom(getattr(text, name))
    if image is not None:
        request.init_latents.CopyFrom(image.latents)
        request.generator_states.CopyFrom(image.generator_states)
        request.strength = plan.strength
    return request


class Denoise(Step):
    name, writes, stages = "denoise", ("latents",), ("denoiser",)

    def __init__(self, img2img: bool = False, phase: str = BASE) -> None:
        self.img2img = img2img
        self.phase = phase
        self.reads = ("plan", "text", "init_latents") if img2img else ("plan", "text")

    async def run(self, state: RequestState, run: FlowRun) -> None:
        image = state.require("init_latents") if self.img2img else None
        request = denoise_request(state.plan, state.require("text"), image, run.progress)

        def forward(progress: denoiser_pb2.DenoiseProgress) -> None:
            run.events.put_nowait(orchestrator_pb2.GenerateEvent(progress=orchestrator_pb2.StepProgress(
                step=progress.step, total_steps=progress.total_steps, elapsed_ms=elapsed_ms(run.started),
                previews=progress.previews, phase=self.phase)))

        state.latents = await run.clients.denoiser.denoise(run.call, request, self.phase,
                                                           forward if run.progress else None)


class Decode(Step):
    """Latents to pixels (no files: mark_files makes them once, after any pixel work); with
    paste-back, the kept pixels are the init image's exactly."""

    name, reads, writes, stages = "decode", ("plan", "latents"), ("pixels",), ("vae",)

    async def run(self, state: RequestState, run: FlowRun) -> None:
        plan = state.plan
        request = vae_pb2.DecodeRequest(model_id=plan.model.entry.id, latents=state.require("latents").latents,
                                        return_tensor=True, skip_files=True)
        if plan.keep_mask is not None:
            request.paste_pixels.CopyFrom(codec.from_numpy(plan.paste_pixels))
            request.keep_mask.CopyFrom(codec.from_numpy(plan.keep_mask))
        decoded = await run.clients.vae.decode(run.call, request, self.phase)
        state.pixels = codec.to_numpy(decoded.pixels, "pixels")


@dataclass(frozen=True)
class Flow:
    name: str
    steps: tuple[Step, ...]

    def stages(self) -> list[str]:
        return sorted({stage for step in self.steps for stage in step.stages})

    def check(self, produces: str = "files") -> None:
        """Every step reads only what the request or an earlier step wrote; the flow writes
        `produces` (a served flow: the files; stage 1 of one: the pixels)."""
        written = {"plan"}
        for step in self.steps:
            unknown = set(step.reads) | set(step.writes)
            if not unknown <= STATE_FIELDS:
                raise ValueError(f"flow {self.name}: {step!r} names unknown state fields {sorted(unknown - STATE_FIELDS)}")
            missing = set(step.reads) - written
            if missing:
                raise ValueError(f"flow {self.name}: {step!r} reads {sorted(missing)} before any step writes it")
            written |= set(step.writes)
        if produces not in written:
            raise ValueError(f"flow {self.name}: no step writes the {produces}")


# Stage 1 of every served flow: the work up to the decoded pixels (services.orchestrator.flows
# puts the safety steps around it).
BASE_FLOWS = {
    "txt2img": Flow("txt2img", (EncodePrompt(), Denoise(), Decode())),
    "img2img": Flow("img2img", (Together(EncodePrompt(), EncodeInitImage()), Denoise(img2img=True), Decode())),
    "inpaint": Flow("inpaint", (Together(EncodePrompt(), EncodeInitImage()), Denoise(img2img=True), Decode())),
}
for _flow in BASE_FLOWS.values():
    _flow.check(produces="pixels")


def choose_base_flow(plan: GenerationPlan) -> Flow:
    """Stage 1's flow (its name is the served flow's, without face work: services.orchestrator.flows)."""
    if plan.change_map is not None:
        return BASE_FLOWS["inpaint"]
    if plan.is_img2img:
        return BASE_FLOWS["img2img"]
    return BASE_FLOWS["txt2img"]


async def execute(steps: Sequence[Step], state: RequestState, run: FlowRun) -> None:
    """Runs the steps in order; the steps a step plans run right after it. A step that sets
    state.halted ends the flow there (the reply then says why, without images)."""
    pending = list(steps)
    while pending and not state.halted:
        step = pending.pop(0)
        planned = await step.run(state, run)
        if planned:
            pending[:0] = planned


def response(state: RequestState, run: FlowRun, with_images: bool = True) -> orchestrator_pb2.GenerateResponse:
    """The reply: the images (unless a stream sends them as image events) and the info."""
    plan, cost = state.plan, run.call.cost()
    telemetry.annotate(**{"diffmesh.cost.device_seconds": cost.device_seconds,
                          "diffmesh.cost.queue_seconds": cost.queue_seconds,
                          "diffmesh.cost.bytes_moved": cost.bytes_moved})
    metrics.record_generation(plan.model.entry.id, len(plan.seeds), cost.device_seconds)  # cost per image
    info = orchestrator_pb2.GenerationInfo(
        request_id=plan.request_id, model=plan.model.entry.id, scheduler=plan.scheduler, steps=plan.steps,
        guidance_scale=plan.guidance_scale, strength=plan.strength, width=plan.width, height=plan.height,
        timings=run.call.timings, total_ms=elapsed_ms(run.started), cost=cost,
        trace_id=telemetry.sampled_trace_id() or "")
    if state.safety is not None:
        info.safety.CopyFrom(state.safety.report())
    if not with_images:
        return orchestrator_pb2.GenerateResponse(info=info)
    return orchestrator_pb2.GenerateResponse(images=generated_images(state), info=info)


def generated_images(state: RequestState) -> list[orchestrator_pb2.GeneratedImage]:
    """The images the caller gets: none when the flow halted; withheld ones (no file) are left
    out, so an image's `index` (its seed's position) may skip."""
    if state.halted:
        return []
    images = []
    for i, (file, seed) in enumerate(zip(state.require("files"), state.plan.seeds)):
        if file is None:
            continue
        image = orchestrator_pb2.GeneratedImage(image=file, seed=seed, index=i)
        if state.face_work is not None:
            image.faces.CopyFrom(state.face_work.reports[i])
        if state.safety is not None and i in state.safety.markings:
            image.marking.CopyFrom(state.safety.markings[i])
        images.append(image)
    return images


async def require_stages(flow: Flow, run: FlowRun) -> None:
    """Before any stage works: every stage the flow needs is configured (FAILED_PRECONDITION)
    and reachable on the variant this request routes to (UNAVAILABLE naming the stage)."""
    stages = flow.stages()
    for stage in stages:
        run.clients.require(stage)
    await run.clients.check_reachable(stages, run.call, run.readiness_wait_s)


async def complete(flow: Flow, state: RequestState, run: FlowRun) -> orchestrator_pb2.GenerateResponse:
    """Runs the flow to its response, images included (unary Generate: no events)."""
    await require_stages(flow, run)
    await execute(flow.steps, state, run)
    return response(state, run)


async def _settle(futures: Sequence[asyncio.Future | None]) -> None:
    """Cancels what is still running and waits for it to finish its cleanup (stage calls
    cancelled, spans ended) in this request's own task; marks failures as retrieved so none is
    reported as never retrieved."""
    pending = [future for future in futures if future is not None and not future.done()]
    for future in pending:
        future.cancel()
    if pending:
        # Shielded: a second cancel of the caller must not leave the cleanup half done.
        await asyncio.shield(asyncio.wait(pending))
    for future in futures:
        if future is not None and future.done() and not future.cancelled():
            future.exception()


async def run_flow(flow: Flow, state: RequestState, run: FlowRun) -> AsyncIterator[orchestrator_pb2.GenerateEvent]:
    """Yields progress events while the steps run, then each image in chunks (image events),
    then one event with the response's info. Close it (aclosing) to stop it early."""
    await require_stages(flow, run)
    task = asyncio.ensure_future(execute(flow.steps, state, run))
    getter: asyncio.Future | None = None
    try:
        while True:
            getter = asyncio.ensure_future(run.events.get())
            done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                break
            yield getter.result()
        while not run.events.empty():
            yield run.events.get_nowait()
        await task
    finally:
        # Cancelled, closed or failed midway: stop the steps (their stage calls cancel with
        # them) and the waiting getter, and wait until both have finished.
        await _settle((task, getter))
    for chunk in image_chunks(generated_images(state), run.stream_chunk_bytes):
        yield orchestrator_pb2.GenerateEvent(image=chunk)
    yield orchestrator_pb2.GenerateEvent(result=response(state, run, with_images=False))
