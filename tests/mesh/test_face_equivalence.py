"""The face flow on SDXL equals diffusers in-process on the same crops, masks and embeddings.

The reference, written for this test: the faces' crops and soft masks from the same geometry
(services.orchestrator.face_detailing, from the boxes the reply reports), each face through
diffusers' own StableDiffusionXLImg2ImgPipeline with the same seed (image seed + face index),
strength, steps, guidance and scheduler, differential diffusion applied in its step-end callback
(after step i of K, a latent pixel whose area-averaged map value is at most 1 - (i + 1) / K is
reset to the original latents noised to the next timestep with the img2img noise, or to the clean
original after the last step), then decoded by the pipeline and pasted back through the masks.
The mesh batches every face into one denoiser call; the reference runs each face alone.
"""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLImg2ImgPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from diffmesh.client import build_request
from services.orchestrator import face_detailing as geometry

PHOTO = Path(importlib.util.find_spec("insightface").submodule_search_locations[0]) / "data" / "images" / "t1.jpg"
PROMPT = "a portrait, detailed face"
SEED, STEPS, STRENGTH, GUIDANCE, FACES = 11, 6, 0.5, 4.0, 3


def rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def pipe(entries):
    return StableDiffusionXLImg2ImgPipeline.from_pretrained(entries["tiny-sdxl"].path, torch_dtype=torch.float32)


def reference_face(pipe, crop: np.ndarray, mask: np.ndarray, seed: int) -> np.ndarray:
    """One face through diffusers' img2img pipeline with differential diffusion in its callback."""
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
        return {"latents": torch.where(free, kwargs["latents"], target.to(kwargs["latents"].dtype))}

    out = pipe(PROMPT, image=Image.fromarray(crop), strength=STRENGTH, num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(seed),
               callback_on_step_end=step_end, callback_on_step_end_tensor_inputs=["latents"], output_type="np")
    return (out.images[0] * 255).round().clip(0, 255).astype(np.uint8)


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
    assert np.abs(got.astype(int) - expected).max() <= 1
    weight = np.zeros((height, width), np.float32)
    for (x1, y1, x2, y2), mask in zip(plan.boxes, masks_crop):
        np.maximum(weight[y1:y2, x1:x2], mask, out=weight[y1:y2, x1:x2])
    outside = weight == 0
    assert outside.mean() > 0.5 and np.array_equal(got[outside], base[outside])
