"""The mesh's images equal diffusers' own pipelines run in-process on the same weights, scheduler
and seeds (max absolute pixel difference <= 1 on 0-255)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
                       StableDiffusionXLPipeline)
from PIL import Image

from diffmesh.client import build_request
from diffmesh.models.schedulers import SCHEDULERS, build_scheduler

TOLERANCE = 1
PIPELINES = {
    "tiny-sd15": (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline),
    "tiny-sdxl": (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline),
}


@pytest.fixture(scope="module")
def reference(tiny_models):
    """diffusers pipelines, loaded once per model and kind."""
    cache = {}

    def get(model_id: str, img2img: bool, scheduler: str):
        key = (model_id, img2img)
        if key not in cache:
            cls = PIPELINES[model_id][int(img2img)]
            extra = {"add_watermarker": False} if "XL" in cls.__name__ else {}
            pipe = cls.from_pretrained(tiny_models / model_id, local_files_only=True, **extra)
            # The model's own scheduler config: every named scheduler is built from it, as the mesh does.
            cache[key] = pipe, dict(pipe.scheduler.config)
        pipe, base_config = cache[key]
        pipe.scheduler = build_scheduler(SCHEDULERS[scheduler], base_config)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return get


def generators(seed: int, count: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def assert_images_match(expected: list[Image.Image], response) -> None:
    assert len(response.images) == len(expected)
    for ref, got in zip(expected, response.images):
        ref_pixels = np.asarray(ref).astype(np.int16)
        got_pixels = pixels(got.image.data)
        assert got_pixels.shape == ref_pixels.shape
        assert ref_pixels.std() > 5, "reference image is flat: the comparison would prove nothing"
        assert np.abs(ref_pixels - got_pixels).max() <= TOLERANCE


ALL_SCHEDULERS = sorted(SCHEDULERS)
TXT2IMG_CASES = [("tiny-sd15", name) for name in ALL_SCHEDULERS] + [
    ("tiny-sdxl", name) for name in ("euler", "dpmpp_2m", "ddim", "euler_a", "unipc")]


@pytest.mark.parametrize("model_id,scheduler", TXT2IMG_CASES)
def test_txt2img_equals_diffusers(client, reference, model_id, scheduler):
    pipe = reference(model_id, False, scheduler)
    expected = pipe("a photo of a cat", negative_prompt="blurry, low quality", width=96, height=64,
                    num_inference_steps=8, guidance_scale=6.0, num_images_per_prompt=2,
                    generator=generators(1234, 2)).images
    response = client.generate(build_request(
        "a photo of a cat", negative_prompt="blurry, low quality", model=model_id, width=96, height=64,
        steps=8, scheduler=scheduler, guidance_scale=6.0, seed=1234, count=2))
    assert [img.seed for img in response.images] == [1234, 1235]
    assert_images_match(expected, response)


def test_sdxl_without_negative_prompt_uses_zero_conditioning(client, reference):
    # SDXL's force_zeros_for_empty_prompt: no negative prompt differs from an empty one.
    pipe = reference("tiny-sdxl", False, "euler")
    expected = pipe("a red house", width=64, height=64, num_inference_steps=6, guidance_scale=5.0,
                    generator=generators(5, 1)).images
    response = client.generate(build_request("a red house", model="tiny-sdxl", width=64, height=64, steps=6,
                                             scheduler="euler", guidance_scale=5.0, seed=5))
    assert_images_match(expected, response)
    with_empty = client.generate(build_request("a red house", negative_prompt="", model="tiny-sdxl", width=64,
                                               height=64, steps=6, scheduler="euler", guidance_scale=5.0, seed=5))
    assert np.abs(pixels(with_empty.images[0].image.data) - pixels(response.images[0].image.data)).max() > TOLERANCE


@pytest.mark.parametrize("model_id", sorted(PIPELINES))
@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_img2img_equals_diffusers(client, reference, model_id, scheduler):
    init = reference(model_id, False, "euler")("a beach", width=80, height=64, num_inference_steps=4,
                                               generator=generators(9, 1)).images[0]
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    pipe = reference(model_id, True, scheduler)
    expected = pipe("a dog on a beach", image=init, strength=0.6, num_inference_steps=10, guidance_scale=5.0,
                    num_images_per_prompt=2, generator=generators(77, 2)).images
    response = client.generate(build_request(
        "a dog on a beach", model=model_id, init_image=buffer.getvalue(), strength=0.6, steps=10,
        scheduler=scheduler, guidance_scale=5.0, seed=77, count=2))
    assert (response.info.width, response.info.height) == (80, 64)
    assert_images_match(expected, response)
    # The result is not just the init image handed back.
    assert np.abs(pixels(response.images[0].image.data) - np.asarray(init).astype(np.int16)).max() > 10


def test_image_i_of_a_batch_equals_a_single_request_with_seed_plus_i(client):
    request = dict(model="tiny-sd15", width=64, height=64, steps=6, scheduler="euler", guidance_scale=4.0)
    batch = client.generate(build_request("a lighthouse", seed=40, count=3, **request))
    for i in range(3):
        single = client.generate(build_request("a lighthouse", seed=40 + i, count=1, **request))
        assert single.images[0].seed == batch.images[i].seed == 40 + i
        diff = np.abs(pixels(single.images[0].image.data) - pixels(batch.images[i].image.data)).max()
        assert diff <= TOLERANCE
    # Different seeds give different images.
    assert np.abs(pixels(batch.images[0].image.data) - pixels(batch.images[1].image.data)).max() > 10
