"""Request validation and the per-request plan (services/orchestrator/plan.py): no gRPC, no models run."""
from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from diffmesh.models.registry import ModelFamily
from diffmesh.models.tiny import SD15_ID, SDXL_ID, build_tiny_models
from diffmesh.proto.v1 import common_pb2, orchestrator_pb2
from diffmesh.errors import InvalidArgument
from services.orchestrator.plan import MAX_SEED, GenerationPlan, Limits, ModelCatalog, plan_request

# The orchestrator's defaults (OrchestratorConfig.limits()).
LIMITS = Limits(default_model="", default_scheduler="euler", default_steps=30, default_strength=0.75,
                max_size=2048, max_steps=150, max_count=8, max_guidance=50.0, max_prompt_chars=4000,
                max_init_image_bytes=32 * 1024 * 1024)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> ModelCatalog:
    root = tmp_path_factory.mktemp("models")
    build_tiny_models(root)
    return ModelCatalog.load(root / "registry.yaml")


def _png(width: int, height: int) -> bytes:
    rng = np.random.default_rng(width * 1000 + height)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _plan(catalog: ModelCatalog, limits: Limits = LIMITS, **fields: Any) -> GenerationPlan:
    fields.setdefault("prompt", "a cat")
    return plan_request(orchestrator_pb2.GenerateRequest(**fields), limits, catalog, "req-1")


def test_catalog_knows_each_tiny_model(catalog: ModelCatalog) -> None:
    assert catalog.ids() == [SD15_ID, SDXL_ID]
    assert catalog.get(SD15_ID).family is ModelFamily.SD15
    assert catalog.get(SDXL_ID).family is ModelFamily.SDXL
    # default size = UNet sample_size x the VAE's scale factor (8)
    assert catalog.get(SD15_ID).default_size == 64
    assert catalog.get(SDXL_ID).default_size == 128
    assert catalog.get("nope") is None


def test_txt2img_defaults(catalog: ModelCatalog) -> None:
    plan = _plan(catalog, seed=11)
    assert plan.request_id == "req-1"
    assert plan.model.entry.id == SD15_ID  # no default_model configured: the first registry id
    assert (plan.width, plan.height) == (64, 64)
    assert plan.steps == 30 and plan.scheduler == "euler"
    assert plan.guidance_scale == 7.5 and plan.guided
    assert plan.seeds == [11]
    assert plan.negative_prompt is None
    assert plan.init_pixels is None and not plan.is_img2img and plan.strength == 0.0
    assert plan.output_format == common_pb2.PNG and plan.quality == 0


def test_sdxl_defaults_and_default_model_limit(catalog: ModelCatalog) -> None:
    plan = _plan(catalog, model=SDXL_ID)
    assert (plan.width, plan.height) == (128, 128)
    assert plan.guidance_scale == 5.0
    configured = dataclasses.replace(LIMITS, default_model=SDXL_ID, default_scheduler="ddim", default_steps=12)
    plan = _plan(catalog, configured)
    assert plan.model.entry.id == SDXL_ID and plan.scheduler == "ddim" and plan.steps == 12


def test_explicit_values_are_kept(catalog: ModelCatalog) -> None:
    plan = _plan(catalog, model=SDXL_ID, negative_prompt="", width=256, height=136, steps=150,
                 scheduler="DPMSolverMultistepScheduler", guidance_scale=1.0, seed=MAX_SEED - 3,
                 count=3, output_format=common_pb2.WEBP, quality=100, request_key="k" * 256)
    assert (plan.width, plan.height, plan.steps) == (256, 136, 150)
    assert plan.negative_prompt == ""  # set but empty is not the same as unset
    assert plan.scheduler == "DPMSolverMultistepScheduler"
    assert plan.guidance_scale == 1.0 and not plan.guided
    assert plan.seeds == [MAX_SEED - 3, MAX_SEED - 2, MAX_SEED - 1]
    assert plan.output_format == common_pb2.WEBP and plan.quality == 100
    assert _plan(catalog, guidance_scale=0.0).guidance_scale == 0.0
    assert _plan(catalog, guidance_scale=50.0).guidance_scale == 50.0


def test_seeds_count_up_from_the_seed(catalog: ModelCatalog) -> None:
    assert _plan(catalog, seed=0, count=8).seeds == list(range(8))
    assert _plan(catalog, seed=1234, count=4).seeds == [1234, 1235, 1236, 1237]
    random_seeds = _plan(catalog, count=3).seeds
    assert 0 <= random_seeds[0] < 2**32 and random_seeds == [random_seeds[0] + i for i in range(3)]


def test_img2img_size_from_the_init_image(catalog: ModelCatalog) -> None:
    plan = _plan(catalog, model=SDXL_ID, init_image=_png(101, 79), seed=1)
    assert (plan.width, plan.height) == (96, 72)  # rounded down to multiples of 8
    assert plan.is_img2img and plan.init_pixels.shape == (1, 79, 101, 3) and plan.init_pixels.dtype == np.uint8
    assert plan.strength == 0.75  # the configured default
    plan = _plan(catalog, init_image=_png(64, 48), strength=0.5, steps=2)
    assert (plan.width, plan.height, plan.strength) == (64, 48, 0.5)
    # an explicit size wins over the image's
    plan = _plan(catalog, init_image=_png(64, 48), width=32, height=40)
    assert (plan.width, plan.height) == (32, 40)
    jpeg = io.BytesIO()
    Image.new("L", (17, 16), 128).save(jpeg, format="JPEG")  # greyscale in, RGB out
    plan = _plan(catalog, init_image=jpeg.getvalue())
    assert (plan.width, plan.height) == (16, 16) and plan.init_pixels.shape == (1, 16, 17, 3)


_BIG = "x" * 100_000
_IMG = _png(64, 64)

INVALID = [
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("whitespace prompt", {"prompt": " \t\n "}, "prompt"),
    ("100 kB prompt", {"prompt": _BIG}, "prompt"),
    ("100 kB negative prompt", {"negative_prompt": _BIG}, "negative_prompt"),
    ("unknown model", {"model": "sd-nope"}, "model"),
    ("unknown scheduler", {"scheduler": "warp_drive"}, "scheduler"),
    ("steps 0", {"steps": 0}, "steps"),
    ("steps -1", {"steps": -1}, "steps"),
    ("steps 10000", {"steps": 10000}, "steps"),
    ("steps 151", {"steps": 151}, "steps"),
    ("width 7", {"width": 7}, "width"),
    ("height 9", {"height": 9}, "height"),
    ("width 100000", {"width": 100000}, "width"),
    ("width 2056", {"width": 2056}, "width"),
    ("width -8", {"width": -8}, "width"),
    ("width 0", {"width": 0}, "width"),
    ("guidance NaN", {"guidance_scale": math.nan}, "guidance_scale"),
    ("guidance inf", {"guidance_scale": math.inf}, "guidance_scale"),
    ("guidance -inf", {"guidance_scale": -math.inf}, "guidance_scale"),
    ("guidance -1", {"guidance_scale": -1.0}, "guidance_scale"),
    ("guidance 51", {"guidance_scale": 51.0}, "guidance_scale"),
    ("count 0", {"count": 0}, "count"),
    ("count -3", {"count": -3}, "count"),
    ("count 1000", {"count": 1000}, "count"),
    ("negative seed", {"seed": -1}, "seed"),
    ("seed overflowing with count", {"seed": MAX_SEED, "count": 2}, "seed"),
    ("init_image not an image", {"init_image": b"not an image"}, "init_image"),
    ("init_image truncated PNG", {"init_image": _IMG[:60]}, "init_image"),
    ("init_image smaller than 8 px", {"init_image": _png(7, 64)}, "init_image"),
    ("strength 0", {"init_image": _IMG, "strength": 0.0}, "strength"),
    ("strength 1.5", {"init_image": _IMG, "strength": 1.5}, "strength"),
    ("strength NaN", {"init_image": _IMG, "strength": math.nan}, "strength"),
    ("strength -0.5", {"init_image": _IMG, "strength": -0.5}, "strength"),
    ("strength without init_image", {"strength": 0.5}, "strength"),
    ("strength * steps < 1", {"init_image": _IMG, "strength": 0.4, "steps": 2}, "strength"),
    ("output_format 99", {"output_format": 99}, "output_format"),
    ("quality 101", {"quality": 101}, "quality"),
    ("quality -1", {"quality": -1}, "quality"),
    ("request_key 300 chars", {"request_key": "k" * 300}, "request_key"),
]


@pytest.mark.parametrize("fields, field", [(f, n) for _, f, n in INVALID], ids=[c for c, _, _ in INVALID])
def test_invalid_requests_name_the_field(catalog: ModelCatalog, fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        _plan(catalog, **fields)
    exc = info.value
    assert exc.field == field
    assert exc.code == "INVALID_ARGUMENT"
    message = str(exc)
    assert message.startswith(field + ":")
    assert len(message) < 400, message[:500]


def test_huge_values_are_truncated_in_the_message(catalog: ModelCatalog) -> None:
    with pytest.raises(InvalidArgument) as info:
        _plan(catalog, prompt=_BIG)
    message = str(info.value)
    assert len(message) < 400
    assert "100000 long" in message and "4000" in message
    assert _BIG[:1000] not in message


def test_init_image_larger_than_the_limit(catalog: ModelCatalog) -> None:
    image = _png(64, 64)
    small = dataclasses.replace(LIMITS, max_init_image_bytes=len(image) - 1)
    with pytest.raises(InvalidArgument) as info:
        _plan(catalog, small, init_image=image)
    assert info.value.field == "init_image" and f"{len(image)} bytes" in str(info.value)
    assert _plan(catalog, dataclasses.replace(LIMITS, max_init_image_bytes=len(image)),
                 init_image=image).is_img2img


def test_values_are_named_in_the_message(catalog: ModelCatalog) -> None:
    for fields, expected in [({"steps": 10000}, "10000"), ({"width": 7}, "7"),
                             ({"model": "sd-nope"}, "'sd-nope'"), ({"count": 1000}, "1000")]:
        with pytest.raises(InvalidArgument) as info:
            _plan(catalog, **fields)
        assert f"(got {expected})" in str(info.value)
    with pytest.raises(InvalidArgument) as info:
        _plan(catalog, model="sd-nope")
    assert SD15_ID in str(info.value) and SDXL_ID in str(info.value)  # lists the known ids
