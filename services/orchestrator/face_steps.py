"""Stage 2 of two-stage generation: face detailing with identity, as declared steps.

    analyze_references   face.Analyze of the reference photos: each one's best face (its raw
                         embedding, PhotoMaker V2's input) and the class word from their gender;
                         a photo without a face is INVALID_ARGUMENT naming it, before stage 1 runs
    (stage 1: the base flow's steps up to decode, or the caller's photo as the base)
    find_faces           face.Analyze of every base image in one call; keeps faces by confidence,
                         size ratio and the k largest, in reading order; plans one crop, soft
                         mask and prompt per face; then plans the steps below (none when no face
                         is kept: the report says why)
    encode_face_prompts  one text_encoder call per distinct face prompt (with the trigger word when
                         there are references) and face.EncodeIdentity for each (identity fused)
      | encode_face_crops  vae.Encode of every crop, each with its own seed (image seed + face j)
    denoise_faces        ONE denoiser call for all faces of all images (per-face conditioning rows,
                         progressive masks from the soft masks, the identity merging after
                         start_merge_step, the identity encoder's LoRA on)
    decode_faces         vae.Decode of the detailed crops
    composite_faces      each crop pasted back through its mask, colour-matched; pixels outside
                         every mask stay the base's exactly
    measure_identity     face.Analyze of the detailed crops: each face's identity similarity to the
                         references (with references only)

Faces are personal data: references, crops and embeddings live in this request's state only and
go nowhere else (no log line, span attribute or metric carries them).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from diffmesh.errors import InvalidArgument
from diffmesh.proto.v1 import common_pb2, denoiser_pb2, face_pb2, orchestrator_pb2, text_encoder_pb2, vae_pb2
from diffmesh.runtime import codec
from diffmesh.runtime.logs import elapsed_ms
from services.orchestrator import face_detailing as geometry
from services.orchestrator.face_plan import FacePlan
from services.orchestrator.plan import GenerationPlan
from services.orchestrator.steps import FlowRun, RequestState, Step, Together

FACES = "faces"  # the phase of stage 2
CLASS_WORDS = {face_pb2.GENDER_FEMALE: "woman", face_pb2.GENDER_MALE: "man"}
NEUTRAL_CLASS_WORD = "person"


@dataclass
class ReferenceIdentity:
    """The references' faces: raw embeddings (one per reference photo, each repeated face_weight
    times for the encoder), their mean unit vector (to measure similarity), the class word."""

    embeddings: np.ndarray          # float32 [k, D], raw
    mean_direction: np.ndarray      # float32 [D], unit
    class_word: str
    embedding_model: str
    images: list[np.ndarray]        # uint8 [H, W, 3], repeated face_weight times


@dataclass
class FaceJob:
    """One face to re-render: where it is, its crop and mask, its prompt and seed."""

    image: int                      # index of the base image
    index: int                      # reading order within its image
    detection: geometry.Detection
    prompt: str | None              # None: [SKIP]
    seed: int


@dataclass
class FaceWork:
    """What find_faces planned for the whole request."""

    jobs: list[FaceJob]             # the faces re-rendered, in batch order
    plan: geometry.CropPlan         # one crop per job, all resized to plan.size
    masks_detail: np.ndarray        # float32 [N, S, S]
    masks_crop: list[np.ndarray]    # float32 [h_i, w_i] at each crop's size in the base
    reports: list[orchestrator_pb2.FaceDetailingReport]
    conditioning: dict[str, text_encoder_pb2.EncodeTextResponse] = field(default_factory=dict)
    fused: dict[str, np.ndarray] = field(default_factory=dict)  # prompt -> identity-fused prompt_embeds
    init: vae_pb2.EncodeImageResponse | None = None
    latents: denoiser_pb2.DenoiseResult | None = None
    crops: np.ndarray | None = None # uint8 [N, S, S, 3] detailed


def face_prompt(segment: str, identity: ReferenceIdentity | None, trigger: str) -> str:
    """The prompt of one face; with references, "<class word> <trigger>" leads it unless the
    caller placed the trigger word already."""
    if identity is None or trigger in segment.split():
        return segment
    return f"{identity.class_word} {trigger}, {segment}"


class AnalyzeReferences(Step):
    name, reads, writes, stages, phase = "analyze_references", ("plan",), ("references",), ("face",), FACES

    async def run(self, state: RequestState, run: FlowRun) -> None:
        faces: FacePlan = state.plan.faces
        if not faces.with_identity:
            return None
        request = face_pb2.AnalyzeRequest(model_id=faces.options.face_model, max_faces=1,
                                          images=[codec.from_numpy(image) for image in faces.references])
        reply = await run.clients.face.analyze(run.call, request, self.phase)
        rows, genders = [], []
        for i, found in enumerate(reply.images):
            if not found.faces:
                raise InvalidArgument(f"reference_faces[{i}]", "no face", "no face was found in this reference photo")
            best = found.faces[0]
            rows.append(codec.to_numpy(best.embedding, "embedding").astype(np.float32))
            genders.append(best.gender)
        embeddings = np.stack(rows)
        unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
        mean = unit.mean(axis=0)
        known = [g for g in genders if g in CLASS_WORDS]
        class_word = CLASS_WORDS[max(set(known), key=known.count)] if known else NEUTRAL_CLASS_WORD
        weight = faces.face_weight
        state.references = ReferenceIdentity(
            embeddings=np.repeat(embeddings, weight, axis=0), mean_direction=mean / np.linalg.norm(mean),
            class_word=class_word, embedding_model=reply.images[0].faces[0].embedding_model,
            images=[image for image in faces.references for _ in range(weight)])
        return None


class UseBaseImage(Step):
    """Stage 1 is the caller's photo: every image of the request starts from it."""

    name, reads, writes, stages, phase = "use_base_image", ("plan",), ("pixels",), (), "base"

    async def run(self, state: RequestState, run: FlowRun) -> None:
        plan: GenerationPlan = state.plan
        state.pixels = np.repeat(plan.faces.base_pixels[None], len(plan.seeds), axis=0)
        return None


def _detection(face: face_pb2.DetectedFace) -> geometry.Detection:
    box = (face.box.x1, face.box.y1, face.box.x2, face.box.y2)
    landmarks = np.array([[p.x, p.y] for p in face.landmarks], dtype=np.float32).reshape(-1, 2)
    return geometry.Detection(box=box, landmarks=landmarks, score=face.score)


def _skipped(reason: str, found: int = 0) -> orchestrator_pb2.FaceDetailingReport:
    return orchestrator_pb2.FaceDetailingReport(detailed=False, skipped_reason=reason, faces_found=found)


class FindFaces(Step):
    # Its stages include those of the steps it plans, so that a flow's stage check covers them.
    name, reads, writes, phase = "find_faces", ("plan", "pixels"), ("face_work",), FACES
    stages = ("face", "text_encoder", "vae", "denoiser")

    async def run(self, state: RequestState, run: FlowRun):
        plan: GenerationPlan = state.plan
        options = plan.faces.options
        pixels = state.require("pixels")
        request = face_pb2.AnalyzeRequest(model_id=options.face_model, skip_embeddings=True,
                                          images=[codec.from_numpy(np.ascontiguousarray(image)) for image in pixels])
        reply = await run.clients.face.analyze(run.call, request, self.phase)
        height, width = pixels.shape[1:3]
        identity = getattr(state, "references", None)
        jobs: list[FaceJob] = []
        reports: list[orchestrator_pb2.FaceDetailingReport] = []
        for image, found in enumerate(reply.images):
            detections = [_detection(face) for face in found.faces]
            kept = geometry.select_faces(detections, width, height, confidence=options.confidence,
                                         min_ratio=options.min_ratio, max_ratio=options.max_ratio,
                                         max_faces=options.max_faces)
            if not kept:
                reports.append(_skipped("no faces found" if not detections else "no face passed the filters",
                                        len(detections)))
                continue
            if options.strength == 0:
                reports.append(_skipped("strength is 0", len(detections)))
                continue
            prompts = geometry.split_face_prompts(options.prompt, plan.prompt, len(kept))
            report = orchestrator_pb2.FaceDetailingReport(detailed=True, faces_found=len(detections))
            if identity is not None:
                report.embedding_model = identity.embedding_model
            reports.append(report)
            for j, (detection, segment) in enumerate(zip(kept, prompts)):
                text = None if segment is None else face_prompt(segment, identity, options.trigger_word)
                jobs.append(FaceJob(image=image, index=j, detection=detection, prompt=text, seed=plan.seeds[image] + j))
        work_jobs = [job for job in jobs if job.prompt is not None]
        crop_plan = geometry.plan_crops([job.detection for job in work_jobs], width, height, padding=options.padding,
                                        size=options.size, max_magnification=options.max_magnification)
        masks_detail, masks_crop = geometry.face_masks([job.detection for job in work_jobs], crop_plan,
                                                       shape=options.mask_shape, dilate=options.mask_dilate,
                                                       blur=options.mask_blur)
        state.face_work = FaceWork(work_jobs, crop_plan, masks_detail, masks_crop, reports)
        self._report_faces(state.face_work, jobs)
        if not work_jobs:
            for report in reports:
                if report.detailed:
                    report.detailed, report.skipped_reason = False, "every face was [SKIP]"
            return None
        steps: list = [Together(EncodeFacePrompts(), EncodeFaceCrops()), DenoiseFaces(), DecodeFaces(),
                       CompositeFaces()]
        if identity is not None:
            steps.append(MeasureIdentity())
        return steps

    @staticmethod
    def _report_faces(work: FaceWork, jobs: list[FaceJob]) -> None:
        position = {id(job): i for i, job in enumerate(work.jobs)}
        for job in jobs:
            x1, y1, x2, y2 = job.detection.box
            face = orchestrator_pb2.DetailedFace(index=job.index, box=face_pb2.FaceBox(x1=x1, y1=y1, x2=x2, y2=y2),
                                                 score=job.detection.score, skipped=job.prompt is None)
            if job.prompt is not None:
                i = position[id(job)]
                cx1, cy1, cx2, cy2 = work.plan.boxes[i]
                face.crop.CopyFrom(face_pb2.FaceBox(x1=cx1, y1=cy1, x2=cx2, y2=cy2))
                mask = work.masks_crop[i]
                face.mask.CopyFrom(common_pb2.EncodedImage(data=geometry.mask_png(mask), mime_type="image/png",
                                                                  width=mask.shape[1], height=mask.shape[0]))
            work.reports[job.image].faces.append(face)


class EncodeFacePrompts(Step):
    name, reads, writes, stages, phase = ("encode_face_prompts", ("plan", "face_work", "references"), ("face_work",),
                                          ("text_encoder", "face"), FACES)

    async def run(self, state: RequestState, run: FlowRun) -> None:
        plan: GenerationPlan = state.plan
        options, faces = plan.faces.options, plan.faces
        work: FaceWork = state.face_work
        identity: ReferenceIdentity | None = getattr(state, "references", None)
        negative = options.negative_prompt if options.negative_prompt is not None else plan.negative_prompt
        guided = options.guidance_scale > 1.0

        async def encode(prompt: str) -> None:
            request = text_encoder_pb2.EncodeTextRequest(model_id=plan.model.entry.id, prompt=prompt,
                                                         with_negative=guided, literal_prompt=plan.literal_prompt)
            if negative is not None:
                request.negative_prompt = negative
            if plan.clip_skip is not None:
                request.clip_skip = plan.clip_skip
            if identity is not None:
                request.trigger_word = options.trigger_word
                request.class_word_repeats = faces.identity_tokens
            text = await run.clients.text_encoder.encode(run.call, request, self.phase)
            work.conditioning[prompt] = text
            if identity is None:
                return
            fuse = face_pb2.EncodeIdentityRequest(
                model_id=options.identity_model, face_model_id=options.face_model,
                reference_images=[codec.from_numpy(image) for image in identity.images],
                id_embeddings=codec.from_numpy(identity.embeddings), prompt_embeds=text.prompt_embeds,
                class_token_positions=text.class_token_positions)
            fused = await run.clients.face.encode_identity(run.call, fuse, self.phase)
            work.fused[prompt] = codec.to_numpy(fused.prompt_embeds, "prompt_embeds")

        await asyncio.gather(*(encode(prompt) for prompt in dict.fromkeys(job.prompt for job in work.jobs)))


class EncodeFaceCrops(Step):
    name, reads, writes, stages, phase = "encode_face_crops", ("plan", "pixels", "face_work"), ("face_work",), \
        ("vae",), FACES

    async def run(self, state: RequestState, run: FlowRun) -> None:
        plan: GenerationPlan = state.plan
        work: FaceWork = state.face_work
        pixels = state.require("pixels")
        crops = np.concatenate([geometry.crop_and_resize(pixels[job.image], _subset(work.plan, i))
                                for i, job in enumerate(work.jobs)])
        request = vae_pb2.EncodeImageRequest(model_id=plan.model.entry.id, pixels=codec.from_numpy(crops),
                                             sampling=vae_pb2.SAMPLE, seeds=[job.seed for job in work.jobs])
        work.init = await run.clients.vae.encode(run.call, request, self.phase)


def _subset(crop_plan: geometry.CropPlan, i: int) -> geometry.CropPlan:
    return geometry.CropPlan(boxes=[crop_plan.boxes[i]], size=crop_plan.size)


def _rows(tensors: Sequence[np.ndarray], field: str) -> np.ndarray:
    """Per-face conditioning rows stacked into [N, ...] (each input [1, ...])."""
    shapes = {t.shape[1:] for t in tensors}
    if len(shapes) != 1:
        # Different window counts cannot share one batch; the text encoder pads positive and
        # negative alike, but two face prompts of different lengths differ.
        raise InvalidArgument("face_detailing.prompt", f"{len(shapes)} lengths", f"the face prompts encode to "
                              f"different lengths ({sorted(s[0] for s in shapes)} tokens); keep every face prompt "
                              f"within the same number of 75-token windows")
    return np.concatenate([np.asarray(t) for t in tensors])


class DenoiseFaces(Step):
    name, reads, writes, stages, phase = "denoise_faces", ("plan", "face_work"), ("face_work",), ("denoiser",), FACES

    async def run(self, state: RequestState, run: FlowRun) -> None:
        plan: GenerationPlan = state.plan
        options = plan.faces.options
        work: FaceWork = state.face_work
        texts = [work.conditioning[job.prompt] for job in work.jobs]
        size = work.plan.size
        request = denoiser_pb2.DenoiseRequest(
            model_id=plan.model.entry.id, scheduler=options.scheduler or plan.scheduler, steps=options.steps,
            guidance_scale=options.guidance_scale, width=size, height=size, seeds=[job.seed for job in work.jobs],
            timesteps=options.timesteps or [], strength=options.strength,
            preview_every=plan.preview_every if run.progress else 0, quiet=not run.progress)
        request.init_latents.CopyFrom(work.init.latents)
        request.generator_states.CopyFrom(work.init.generator_states)
        change = np.clip(np.rint(work.masks_detail * 255.0), 0, 255).astype(np.uint8)
        request.change_map.CopyFrom(codec.from_numpy(change))
        identity = bool(work.fused)
        text_only = "text_only_prompt_embeds" if identity else "prompt_embeds"
        pooled_only = "text_only_pooled_prompt_embeds" if identity else "pooled_prompt_embeds"
        request.prompt_embeds.CopyFrom(codec.from_numpy(_rows([_tensor(t, text_only) for t in texts], "prompt_embeds")))
        if texts[0].HasField(pooled_only):
            request.pooled_prompt_embeds.CopyFrom(codec.from_numpy(_rows([_tensor(t, pooled_only) for t in texts],
                                                                         "pooled")))
        for name in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            if texts[0].HasField(name):
                getattr(request, name).CopyFrom(codec.from_numpy(_rows([_tensor(t, name) for t in texts], name)))
        if identity:
            request.merged_prompt_embeds.CopyFrom(codec.from_numpy(_rows([work.fused[job.prompt] for job in work.jobs],
                                                                         "merged")))
            if texts[0].HasField("pooled_prompt_embeds"):
                request.merged_pooled_prompt_embeds.CopyFrom(codec.from_numpy(
                    _rows([_tensor(t, "pooled_prompt_embeds") for t in texts], "merged_pooled")))
            request.start_merge_step = options.start_merge_step
            request.adapters.append(options.identity_model)

        def forward(progress: denoiser_pb2.DenoiseProgress) -> None:
            run.events.put_nowait(orchestrator_pb2.GenerateEvent(progress=orchestrator_pb2.StepProgress(
                step=progress.step, total_steps=progress.total_steps, elapsed_ms=elapsed_ms(run.started),
                previews=progress.previews, phase=self.phase)))

        work.latents = await run.clients.denoiser.denoise(run.call, request, self.phase,
                                                          forward if run.progress else None)


def _tensor(text: text_encoder_pb2.EncodeTextResponse, name: str) -> np.ndarray:
    return codec.to_numpy(getattr(text, name), name)


class DecodeFaces(Step):
    name, reads, writes, stages, phase = "decode_faces", ("plan", "face_work"), ("face_work",), ("vae",), FACES

    async def run(self, state: RequestState, run: FlowRun) -> None:
        plan: GenerationPlan = state.plan
        work: FaceWork = state.face_work
        request = vae_pb2.DecodeRequest(model_id=plan.model.entry.id, latents=work.latents.latents,
                                        return_tensor=True, skip_files=True)
        decoded = await run.clients.vae.decode(run.call, request, self.phase)
        work.crops = codec.to_numpy(decoded.pixels, "pixels")


class CompositeFaces(Step):
    name, reads, writes, stages, phase = "composite_faces", ("plan", "pixels", "face_work"), ("pixels",), (), FACES

    async def run(self, state: RequestState, run: FlowRun) -> None:
        plan: GenerationPlan = state.plan
        work: FaceWork = state.face_work
        pixels = np.array(state.require("pixels"))  # a copy: the base may be the caller's photo, shared

        def composite() -> np.ndarray:
            for image in range(len(pixels)):
                mine = [i for i, job in enumerate(work.jobs) if job.image == image]
                if not mine:
                    continue
                sub = geometry.CropPlan(boxes=[work.plan.boxes[i] for i in mine], size=work.plan.size)
                pixels[image] = geometry.composite(pixels[image], [work.crops[i] for i in mine], sub,
                                                   [work.masks_crop[i] for i in mine],
                                                   color_match=plan.faces.options.color_match)
            return pixels
        state.pixels = await asyncio.to_thread(composite)


class MeasureIdentity(Step):
    name, reads, writes, stages, phase = ("measure_identity", ("plan", "face_work", "references"), ("face_work",),
                                          ("face",), FACES)

    async def run(self, state: RequestState, run: FlowRun) -> None:
        plan: GenerationPlan = state.plan
        work: FaceWork = state.face_work
        identity: ReferenceIdentity = state.references
        request = face_pb2.AnalyzeRequest(model_id=plan.faces.options.face_model, max_faces=1,
                                          images=[codec.from_numpy(np.ascontiguousarray(c)) for c in work.crops])
        reply = await run.clients.face.analyze(run.call, request, self.phase)
        detailed = [face for report in work.reports for face in report.faces if not face.skipped]
        for face, found in zip(detailed, reply.images):
            if found.faces:
                direction = codec.to_numpy(found.faces[0].normed_embedding, "normed_embedding")
                face.identity_similarity = float(np.dot(direction, identity.mean_direction))
