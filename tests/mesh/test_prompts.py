"""Prompt features through the whole mesh: weighting syntax, long prompts, SDXL's prompt_2,
clip skip."""
from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from diffmesh.client import build_request

BASE = dict(width=64, height=64, steps=3, scheduler="euler", seed=21, guidance_scale=5.0)


def image(client, prompt: str, model: str = "tiny-sdxl", **extra) -> np.ndarray:
    response = client.generate(build_request(prompt, model=model, **{**BASE, **extra}), timeout=60)
    return np.asarray(Image.open(io.BytesIO(response.images[0].image.data))).astype(int)


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_weight_one_is_the_plain_prompt_and_other_weights_change_the_image(client, model):
    plain = image(client, "a red cat on a sofa", model)
    assert np.array_equal(image(client, "a red (cat:1.0) on a sofa", model), plain)
    assert np.abs(image(client, "a red (cat:1.6) on a sofa", model) - plain).max() > 5
    assert np.abs(image(client, "a red [cat] on a sofa", model) - plain).max() > 0


def test_literal_prompt_reads_brackets_as_text(client):
    weighted = image(client, "a (cat:1.6)")
    literal = image(client, "a (cat:1.6)", literal_prompt=True)
    assert np.abs(weighted - literal).max() > 0


def test_prompts_longer_than_75_tokens_are_encoded_in_windows(client):
    long_prompt = ", ".join(["a very detailed photograph of a cat"] * 30)  # ~ 240 tokens
    first_window = ", ".join(["a very detailed photograph of a cat"] * 9)
    assert np.abs(image(client, long_prompt) - image(client, first_window)).max() > 0


def test_sdxl_prompt_2_and_clip_skip_change_the_image(client):
    plain = image(client, "a lighthouse")
    assert np.abs(image(client, "a lighthouse", prompt_2="a dragon") - plain).max() > 0
    assert np.abs(image(client, "a lighthouse", clip_skip=1) - plain).max() > 0
    assert np.array_equal(image(client, "a lighthouse", prompt_2="a lighthouse"), plain)


@pytest.mark.parametrize("extra,field", [
    (dict(model="tiny-sd15", prompt_2="a dragon"), "prompt_2"),
    (dict(clip_skip=-1), "clip_skip"),
    (dict(clip_skip=5), "clip_skip"),  # the tiny encoders have fewer layers: the stage says so
    (dict(negative_prompt_2="x" * 10_000), "negative_prompt_2"),
])
def test_bad_prompt_options_are_rejected(client, extra, field):
    with pytest.raises(grpc.RpcError) as info:
        client.generate(build_request("a cat", **{**BASE, "model": "tiny-sdxl", **extra}), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()
