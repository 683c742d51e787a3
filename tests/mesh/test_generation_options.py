"""Sampling options and editing through the mesh: custom and interpolated timesteps, spacing,
guidance rescale (each equal to diffusers where diffusers has the option), differential-diffusion
inpainting with change maps and masks, paste-back, and live previews."""
from __future__ import annotations

import io
import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from diffmesh.client import build_request, collect_stream
from diffmesh.models.schedulers import SCHEDULERS, build_scheduler
from diffmesh.models.timesteps import FACE_DETAIL_ANCHORS

SMALL = dict(model="tiny-sd15", width=64, height=64, seed=5, guidance_scale=5.0)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def generate(client, prompt="a cottage", **fields):
    return client.generate(build_request(prompt, **{**SMALL, **fields}), timeout=60)


@pytest.fixture(scope="module")
def sd15(tiny_models):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models / "tiny-sd15", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)


def reference(sd15, scheduler="euler", config=None, **kwargs):
    pipe, base_config = sd15
    pipe.scheduler = build_scheduler(SCHEDULERS[scheduler], {**base_config, **(config or {})})
    image = pipe("a cottage", width=64, height=64, guidance_scale=5.0,
                 generator=[torch.Generator().manual_seed(5)], **kwargs).images[0]
    return np.asarray(image).astype(int)


def test_custom_timesteps_equal_diffusers(client, sd15):
    timesteps = [999, 750, 500, 250, 60]
    expected = reference(sd15, timesteps=timesteps)
    got = pixels(generate(client, scheduler="euler", timesteps=timesteps).images[0].image.data)
    assert np.abs(expected - got).max() <= 1


def test_anchor_timesteps_with_ten_steps_are_the_anchors(client, sd15):
    expected = reference(sd15, "dpmpp_2m", timesteps=list(FACE_DETAIL_ANCHORS))
    response = generate(client, scheduler="dpmpp_2m", steps=10, timestep_anchors=list(FACE_DETAIL_ANCHORS))
    assert np.abs(expected - pixels(response.images[0].image.data)).max() <= 1
    other = generate(client, scheduler="dpmpp_2m", steps=14, timestep_anchors=list(FACE_DETAIL_ANCHORS))
    assert other.info.steps == 14


def test_trailing_spacing_and_guidance_rescale_equal_diffusers(client, sd15):
    expected = reference(sd15, config={"timestep_spacing": "trailing"}, num_inference_steps=6, guidance_rescale=0.7)
    got = generate(client, scheduler="euler", steps=6, timestep_spacing="trailing", guidance_rescale=0.7)
    assert np.abs(expected - pixels(got.images[0].image.data)).max() <= 1


@pytest.fixture(scope="module")
def init_png():
    rng = np.random.default_rng(3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def grey_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode="L").save(buffer, "PNG")
    return buffer.getvalue()


def half_map(value_right=255) -> np.ndarray:
    change = np.zeros((64, 96), np.uint8)
    change[:, 48:] = value_right
    return change


def test_change_map_keeps_zero_regions_and_regenerates_255(client, init_png):
    common = dict(init_image=init_png, steps=8, scheduler="euler", width=None, height=None)
    frozen = pixels(generate(client, **common, change_map=grey_png(np.zeros((64, 96)))).images[0].image.data)
    half = generate(client, **common, change_map=grey_png(half_map()))
    out = pixels(half.images[0].image.data)
    assert (half.info.width, half.info.height, half.info.strength) == (96, 64, 1.0)
    # Map 0 keeps the original's latents exactly (tests/unit/test_diff_diffusion.py checks that); in
    # pixels it is the original up to the VAE round trip, and the tiny VAE's mid-block attention
    # lets the regenerated half leak into every pixel, so compare how far each half moved.
    kept, regenerated = np.abs(out[:, :40] - frozen[:, :40]).mean(), np.abs(out[:, 56:] - frozen[:, 56:]).mean()
    assert regenerated > 10 and kept < regenerated / 2
    again = pixels(generate(client, **common, change_map=grey_png(half_map())).images[0].image.data)
    assert np.array_equal(out, again)


def test_paste_back_makes_kept_pixels_exactly_the_original(client, init_png):
    init = pixels(init_png)
    for extra in (dict(change_map=grey_png(half_map(128))), dict(mask=grey_png(half_map()), mask_feather=3.0)):
        response = generate(client, init_image=init_png, steps=6, width=None, height=None, paste_back=True, **extra)
        out = pixels(response.images[0].image.data)
        assert np.array_equal(out[:, :48], init[:, :48])
        assert not np.array_equal(out[:, 48:], init[:, 48:])


def rgb_of(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_previews_stream_every_n_steps_and_do_not_change_the_result(client):
    events = list(client.generate_stream(build_request("a tower", **{**SMALL, "steps": 6, "count": 2,
                                                                      "preview_every": 2}), timeout=60))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [p.step for p in progress] == [1, 2, 3, 4, 5, 6]
    assert [len(p.previews) for p in progress] == [0, 2, 0, 2, 0, 2]
    preview = progress[1].previews[0]
    assert preview.mime_type == "image/jpeg" and Image.open(io.BytesIO(preview.data)).size == (8, 8)
    plain = client.generate(build_request("a tower", **{**SMALL, "steps": 6, "count": 2}), timeout=60)
    # Pixels, not files: each file's C2PA manifest has its own id and time.
    assert [rgb_of(i.image.data).tolist() for i in collect_stream(events).images] == \
        [rgb_of(i.image.data).tolist() for i in plain.images]


def test_cli_writes_previews(mesh, tmp_path):
    done = subprocess.run([sys.executable, "-m", "diffmesh.cli.main", "generate", "--prompt", "a tower", "--model",
                           "tiny-sd15", "--width", "64", "--height", "64", "--steps", "4", "--preview-dir",
                           str(tmp_path / "previews"), "--out", str(tmp_path / "out.png"), "--address",
                           mesh.address("orchestrator")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == [f"step-000{i}-0.jpg" for i in range(1, 5)]
    assert "it/s" in done.stderr and "4/4" in done.stderr


@pytest.mark.parametrize("fields,field", [
    (dict(timesteps=[100, 500, 900]), "timesteps[1]"),
    (dict(timesteps=[999, 500], steps=5), "steps"),
    (dict(scheduler="ddim", timesteps=[999, 500]), "timesteps"),
    (dict(timesteps=[999], timestep_anchors=[999, 13]), "timestep_anchors"),
    (dict(timestep_spacing="sideways"), "timestep_spacing"),
    (dict(scheduler="ddim", sigma_schedule="karras"), "sigma_schedule"),
    (dict(guidance_rescale=2.0), "guidance_rescale"),
    (dict(change_map=b"\x89PNG"), "change_map"),
    (dict(paste_back=True), "paste_back"),
    (dict(preview_every=-1), "preview_every"),
    (dict(mask_feather=2.0), "mask_feather"),
])
def test_bad_options_are_rejected(client, fields, field):
    with pytest.raises(grpc.RpcError) as info:
        generate(client, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()


def test_change_map_of_another_size_is_rejected(client, init_png):
    with pytest.raises(grpc.RpcError) as info:
        generate(client, init_image=init_png, change_map=grey_png(np.zeros((32, 32))), width=None, height=None)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("change_map.shape")
