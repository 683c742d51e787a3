"""The face flow on SDXL equals diffusers in-process on the same crops, masks and embeddings.

The reference, written for this test: the faces' crops and soft masks from the same geometry
(services.orchestrator.face_detailing, from the boxes the reply reports), each face through
diffusers' own StableDiffusionXLImg2ImgPipeline with the same seed (image seed + face index),
strength, steps, guidance and scheduler, differential diffusion applied in its step-end callback
(after step i of K, a latent pixel whose area-averaged map value is at most 1 - (i + 1) / K is
reset to the original latents noised to the next timestep with the img2img noise, or to the clean
original after the last step), then decoded by the pipeline and pasted back through the masks.
The mesh batches every face into one denoiser call; the reference runs each face alone.

With a reference face (identity on), the reference also loads the identity encoder's LoRA into the
pipeline's UNet (load_photomaker_lora, weight 1) and, as PhotoMaker's pipeline does, conditions the
calls with index <= start_merge_step of the full schedule on the text-only prompt and the later
ones on the identity-fused prompt (swapping prompt_embeds and add_text_embeds in the step-end
callback). The conditioning itself comes from the mesh's own text_encoder and face stages, asked
as the orchestrator asks them: the reference checks the denoiser's merge step and adapter.
"""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLImg2ImgPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from diffmesh.client import build_request
from diffmesh.imaging import decode_image
from diffmesh.models.photomaker import load_photomaker_lora, load_photomaker_lora_weights
from diffmesh.proto.v1 import face_pb2, face_pb2_grpc, text_encoder_pb2, text_encoder_pb2_grpc
from diffmesh.runtime import codec
from services.orchestrator import face_detailing as geometry
from services.orchestrator.face_steps import CLASS_WORDS, NEUTRAL_CLASS_WORD
from tests.marks import as_returned, assert_close_as_returned, block_any

PHOTOS = Path(importlib.util.find_spec("insightface").submodule_search_locations[0]) / "data" / "images"
PHOTO, PORTRAIT = PHOTOS / "t1.jpg", PHOTOS / "Tom_Hanks_54745.png"
PROMPT = "a portrait, detailed face"
SEED, STEPS, STRENGTH, GUIDANCE, FACES = 11, 6, 0.5, 4.0, 3
# 6 steps at strength 0.5 run the full schedule's indices 3, 4, 5: index 3 is text-only, 4 and 5 merged.
IDENTITY_MODEL, TRIGGER, MERGE_STEP = "photomaker-tiny", "img", 3


def rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def pipe(entries):
    return StableDiffusionXLImg2ImgPipeline.from_pretrained(entries["tiny-sdxl"].path, torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def identity_pipe(entries):
    """The same pipeline with the identity encoder's LoRA in its UNet, active at weight 1."""
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(entries["tiny-sdxl"].path, torch_dtype=torch.float32)
    load_photomaker_lora(pipe.unet, load_photomaker_lora_weights(entries[IDENTITY_MODEL].path), "photomaker")
    pipe.unet.set_adapters(["photomaker"], [1.0])
    return pipe


def reference_face(pipe, crop: np.ndarray, mask: np.ndarray, seed: int,
                   identity: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    """One face through diffusers' img2img pipeline with differential diffusion in its callback
    and, with `identity`, PhotoMaker's merge step (the text-only rows until MERGE_STEP)."""
    image = pipe.image_processor.preprocess(Image.fromarray(crop))
    replay = torch.Generator("cpu").manual_seed(seed)  # the pipeline's draws: posterior sample, then noise
    with torch.no_grad():
        original = pipe.vae.encode(image).latent_dist.sample(replay) * pipe.vae.config.scaling_factor
    noise = randn_tensor(original.shape, generator=replay, dtype=original.dtype)
    latent_map = F.interpolate(torch.from_numpy(mask)[None, None], size=original.shape[2:], mode="area")

    def step_end(pipeline, i, t, kwargs):
        run = pipeline.num_timesteps
        free = latent_map.double() > 1.0 - (i + 1) / run
        if i + 1 < run:
            target = pipeline.scheduler.add_noise(original, noise, pipeline.scheduler.timesteps[
                pipeline.scheduler.step_index].reshape(1))
        else:
            target = original
        outputs = {"latents": torch.where(free, kwargs["latents"], target.to(kwargs["latents"].dtype))}
        # The next call's index in the full schedule (img2img runs its tail): merged once past MERGE_STEP.
        following = len(pipeline.scheduler.timesteps) - run + i + 1
        if identity is not None and following == MERGE_STEP + 1:
            outputs["prompt_embeds"] = torch.cat([identity["negative_prompt_embeds"], identity["merged"]])
            outputs["add_text_embeds"] = torch.cat([identity["negative_pooled_prompt_embeds"],
                                                    identity["merged_pooled"]])
        return outputs

    if identity is None:
        prompt = {"prompt": PROMPT}
    else:
        assert STEPS - int(STEPS * STRENGTH) <= MERGE_STEP  # the first call is text-only
        prompt = {name: identity[name] for name in ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                                    "negative_pooled_prompt_embeds")}
    out = pipe(**prompt, image=Image.fromarray(crop), strength=STRENGTH, num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(seed),
               callback_on_step_end=step_end,
               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "add_text_embeds"], output_type="np")
    return (out.images[0] * 255).round().clip(0, 255).astype(np.uint8)


def identity_conditioning(mesh) -> dict[str, torch.Tensor]:
    """The face prompt's conditioning from the mesh's own stages, asked as the orchestrator asks:
    face.Analyze of the reference (its best face's raw embedding and gender: the class word),
    text_encoder with the trigger word (2 identity tokens for one reference), face.EncodeIdentity."""
    reference = decode_image(PORTRAIT.read_bytes(), "reference")
    assert max(reference.shape[:2]) <= 1024  # the orchestrator sends it as it is
    with grpc.insecure_channel(mesh.address("face")) as face_channel, \
            grpc.insecure_channel(mesh.address("text_encoder")) as text_channel:
        face = face_pb2_grpc.FaceServiceStub(face_channel)
        [best] = face.Analyze(face_pb2.AnalyzeRequest(max_faces=1, images=[codec.from_numpy(reference)]),
                              timeout=60).images[0].faces
        class_word = CLASS_WORDS.get(best.gender, NEUTRAL_CLASS_WORD)
        text = text_encoder_pb2_grpc.TextEncoderStub(text_channel).Encode(text_encoder_pb2.EncodeTextRequest(
            model_id="tiny-sdxl", prompt=f"{class_word} {TRIGGER}, {PROMPT}", with_negative=True,
            trigger_word=TRIGGER, class_word_repeats=2), timeout=60)
        embedding = codec.to_numpy(best.embedding, "embedding").astype(np.float32)[None]
        fused = face.EncodeIdentity(face_pb2.EncodeIdentityRequest(
            model_id=IDENTITY_MODEL, reference_images=[codec.from_numpy(reference)],
            id_embeddings=codec.from_numpy(embedding), prompt_embeds=text.prompt_embeds,
            class_token_positions=text.class_token_positions), timeout=60)
    tensor = lambda message, name: codec.to_torch(getattr(message, name), name).float()  # noqa: E731
    return {"prompt_embeds": tensor(text, "text_only_prompt_embeds"),
            "pooled_prompt_embeds": tensor(text, "text_only_pooled_prompt_embeds"),
            "negative_prompt_embeds": tensor(text, "negative_prompt_embeds"),
            "negative_pooled_prompt_embeds": tensor(text, "negative_pooled_prompt_embeds"),
            "merged": tensor(fused, "prompt_embeds"), "merged_pooled": tensor(text, "pooled_prompt_embeds")}


def face_region(plan, masks_crop, height: int, width: int) -> np.ndarray:
    """Where any face's composite mask is non-zero, in base pixels."""
    weight = np.zeros((height, width), np.float32)
    for (x1, y1, x2, y2), mask in zip(plan.boxes, masks_crop):
        np.maximum(weight[y1:y2, x1:x2], mask, out=weight[y1:y2, x1:x2])
    return weight > 0


def test_face_flow_equals_diffusers_on_the_same_crops_masks_and_embeddings(client, pipe):
    reply = client.generate(build_request(
        PROMPT, model="tiny-sdxl", seed=SEED, base_image=PHOTO.read_bytes(), detail_faces=True,
        face_detailing={"max_faces": FACES, "steps": STEPS, "strength": STRENGTH, "guidance_scale": GUIDANCE,
                        "color_match": False}), timeout=120)
    image = reply.images[0]
    faces = image.faces.faces
    assert len(faces) == FACES
    assert [t.stage for t in reply.info.timings if t.phase == "faces"].count("denoiser") == 1
    base = rgb(PHOTO.read_bytes())
    height, width = base.shape[:2]
    detections = [geometry.Detection(box=(f.box.x1, f.box.y1, f.box.x2, f.box.y2), score=f.score) for f in faces]
    plan = geometry.plan_crops(detections, width, height, size=128)  # tiny-sdxl's default size
    assert [tuple(int(v) for v in (f.crop.x1, f.crop.y1, f.crop.x2, f.crop.y2)) for f in faces] == plan.boxes
    masks_detail, masks_crop = geometry.face_masks(detections, plan)
    crops = geometry.crop_and_resize(base, plan)
    detailed = [reference_face(pipe, crops[j], masks_detail[j], SEED + face.index)
                for j, face in enumerate(faces)]
    expected = geometry.composite(base, detailed, plan, masks_crop, color_match=False)
    got = rgb(image.image.data)
    # The reply is watermarked: diffusers' result marked with the reply's payload (tests/marks.py).
    assert image.marking.watermarked
    inside = face_region(plan, masks_crop, height, width)
    assert_close_as_returned(got, expected, image.marking, where=inside)
    outside = ~block_any(inside)
    assert outside.mean() > 0.5 and np.array_equal(got[outside], as_returned(base, image.marking)[outside])


def test_face_flow_with_a_reference_face_equals_diffusers_with_the_lora_and_the_merge_step(client, mesh, pipe,
                                                                                            identity_pipe):
    reply = client.generate(build_request(
        PROMPT, model="tiny-sdxl", seed=SEED, base_image=PHOTO.read_bytes(), reference_faces=[PORTRAIT.read_bytes()],
        face_detailing={"max_faces": FACES, "steps": STEPS, "strength": STRENGTH, "guidance_scale": GUIDANCE,
                        "color_match": False, "start_merge_step": MERGE_STEP, "identity_model": IDENTITY_MODEL,
                        "trigger_word": TRIGGER}), timeout=180)
    image = reply.images[0]
    faces = image.faces.faces
    assert len(faces) == FACES
    assert [t.stage for t in reply.info.timings if t.phase == "faces"].count("denoiser") == 1
    base = rgb(PHOTO.read_bytes())
    height, width = base.shape[:2]
    detections = [geometry.Detection(box=(f.box.x1, f.box.y1, f.box.x2, f.box.y2), score=f.score) for f in faces]
    plan = geometry.plan_crops(detections, width, height, size=128)
    masks_detail, masks_crop = geometry.face_masks(detections, plan)
    crops = geometry.crop_and_resize(base, plan)
    identity = identity_conditioning(mesh)
    detailed = [reference_face(identity_pipe, crops[j], masks_detail[j], SEED + face.index, identity)
                for j, face in enumerate(faces)]
    expected = geometry.composite(base, detailed, plan, masks_crop, color_match=False)
    got = rgb(image.image.data)
    faces_region = face_region(plan, masks_crop, height, width)
    assert_close_as_returned(got, expected, image.marking, where=faces_region)
    # The comparison sees identity: without the LoRA and the merge, the same text-only rows give
    # another image.
    text_only = {**identity, "merged": identity["prompt_embeds"], "merged_pooled": identity["pooled_prompt_embeds"]}
    plain = [reference_face(pipe, crops[j], masks_detail[j], SEED + face.index, text_only)
             for j, face in enumerate(faces)]
    with pytest.raises(AssertionError):
        assert_close_as_returned(got, geometry.composite(base, plain, plan, masks_crop, color_match=False),
                                 image.marking, where=faces_region)
