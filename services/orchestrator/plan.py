"""Request validation and the per-request plan. Pure Python: no gRPC, no models loaded.

Everything a request can get wrong is rejected here, before any stage does work, with an
InvalidArgument naming the field and the value.
"""
from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffmesh.imaging import FORMATS, decode_image
from diffmesh.models.registry import ModelEntry, ModelFamily, Registry
from diffmesh.models.schedulers import lookup_scheduler, scheduler_names
from diffmesh.proto.v1 import common_pb2, orchestrator_pb2
from diffmesh.runtime.errors import InvalidArgument

MAX_SEED = 2**63 - 1
MAX_CLIP_SKIP = 24
VAE_MULTIPLE = 8
# diffusers' own defaults per family (StableDiffusionPipeline 7.5, StableDiffusionXLPipeline 5.0).
DEFAULT_GUIDANCE = {ModelFamily.SD15: 7.5, ModelFamily.SDXL: 5.0}


@dataclass(frozen=True)
class Limits:
    default_model: str
    default_scheduler: str
    default_steps: int
    default_strength: float
    max_size: int
    max_steps: int
    max_count: int
    max_guidance: float
    max_prompt_chars: int
    max_init_image_bytes: int


@dataclass(frozen=True)
class CatalogModel:
    entry: ModelEntry
    default_size: int  # the UNet's sample_size in pixels (512 for SD 1.5, 1024 for SDXL)

    @property
    def family(self) -> ModelFamily:
        return self.entry.family


class ModelCatalog:
    """What the orchestrator knows of each model without loading it: family and default size."""

    def __init__(self, registry: Registry) -> None:
        self._models: dict[str, CatalogModel] = {}
        registry.verify()
        for entry in registry.entries():
            unet = json.loads((entry.component_dir("unet") / "config.json").read_text())
            vae = json.loads((entry.component_dir("vae") / "config.json").read_text())
            scale = 2 ** (len(vae["block_out_channels"]) - 1)
            self._models[entry.id] = CatalogModel(entry, int(unet["sample_size"]) * scale)

    @classmethod
    def load(cls, path: str | Path) -> ModelCatalog:
        return cls(Registry.load(Path(path)))

    def ids(self) -> list[str]:
        return sorted(self._models)

    def get(self, model_id: str) -> CatalogModel | None:
        return self._models.get(model_id)


@dataclass(frozen=True)
class GenerationPlan:
    request_id: str
    model: CatalogModel
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    scheduler: str
    guidance_scale: float
    seeds: list[int]
    init_pixels: np.ndarray | None  # uint8 [1, H, W, 3]
    strength: float
    output_format: int
    quality: int
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    clip_skip: int | None = None
    literal_prompt: bool = False

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def is_img2img(self) -> bool:
        return self.init_pixels is not None


def _check_size(field: str, value: int, limits: Limits) -> int:
    if value <= 0 or value % VAE_MULTIPLE or value > limits.max_size:
        raise InvalidArgument(field, value,
                              f"must be a multiple of {VAE_MULTIPLE} in [{VAE_MULTIPLE}, {limits.max_size}]")
    return value


def _check_prompt(field: str, text: str, limits: Limits, required: bool) -> None:
    if required and not text.strip():
        raise InvalidArgument(field, text, "must not be empty")
    if len(text) > limits.max_prompt_chars:
        raise InvalidArgument(field, text, f"longer than {limits.max_prompt_chars} characters")


def plan_request(request: orchestrator_pb2.GenerateRequest, limits: Limits, catalog: ModelCatalog,
                 request_id: str) -> GenerationPlan:
    _check_prompt("prompt", request.prompt, limits, required=True)
    negative = request.negative_prompt if request.HasField("negative_prompt") else None
    if negative is not None:
        _check_prompt("negative_prompt", negative, limits, required=False)

    second = {}
    for name in ("prompt_2", "negative_prompt_2"):
        if request.HasField(name):
            _check_prompt(name, getattr(request, name), limits, required=False)
            second[name] = getattr(request, name)
    clip_skip = request.clip_skip if request.HasField("clip_skip") else None
    if clip_skip is not None and not 0 <= clip_skip <= MAX_CLIP_SKIP:
        raise InvalidArgument("clip_skip", clip_skip, f"must be in [0, {MAX_CLIP_SKIP}]")

    model_id = request.model or limits.default_model or (catalog.ids()[0] if catalog.ids() else "")
    model = catalog.get(model_id)
    if model is None:
        raise InvalidArgument("model", model_id, f"unknown model; known: {', '.join(catalog.ids())}")
    for name, value in second.items():
        if model.family != ModelFamily.SDXL and value:
            raise InvalidArgument(name, value, f"only SDXL models have a second text encoder ({model_id} is "
                                               f"{model.family.value})")

    scheduler = request.scheduler or limits.default_scheduler
    if lookup_scheduler(scheduler) is None:
        raise InvalidArgument("scheduler", scheduler, f"unknown; known: {', '.join(scheduler_names())}")

    steps = request.steps if request.HasField("steps") else limits.default_steps
    if not 1 <= steps <= limits.max_steps:
        raise InvalidArgument("steps", steps, f"must be in [1, {limits.max_steps}]")

    guidance = request.guidance_scale if request.HasField("guidance_scale") else DEFAULT_GUIDANCE[model.family]
    if not math.isfinite(guidance) or not 0.0 <= guidance <= limits.max_guidance:
        raise InvalidArgument("guidance_scale", guidance, f"must be finite, in [0, {limits.max_guidance}]")

    count = request.count if request.HasField("count") else 1
    if not 1 <= count <= limits.max_count:
        raise InvalidArgument("count", count, f"must be in [1, {limits.max_count}]")

    if request.HasField("seed"):
        if not 0 <= request.seed <= MAX_SEED - count:
            raise InvalidArgument("seed", request.seed, f"must be in [0, {MAX_SEED - count}]")
        seed = request.seed
    else:
        seed = secrets.randbelow(2**32)

    if request.output_format and request.output_format not in FORMATS:
        raise InvalidArgument("output_format", request.output_format,
                              f"must be one of {', '.join(common_pb2.ImageFormat.keys())}")
    if not 0 <= request.quality <= 100:
        raise InvalidArgument("quality", request.quality, "must be in [0, 100] (0: default)")
    if len(request.request_key) > 256:
        raise InvalidArgument("request_key", request.request_key, "longer than 256 characters")

    init_pixels, strength = None, 0.0
    if request.init_image:
        if len(request.init_image) > limits.max_init_image_bytes:
            raise InvalidArgument("init_image", f"{len(request.init_image)} bytes",
                                  f"larger than {limits.max_init_image_bytes} bytes")
        pixels = decode_image(request.init_image, "init_image")
        strength = request.strength if request.HasField("strength") else limits.default_strength
        if not math.isfinite(strength) or not 0.0 < strength <= 1.0:
            raise InvalidArgument("strength", strength, "must be in (0, 1]")
        if int(steps * strength) < 1:
            raise InvalidArgument("strength", strength, f"with {steps} steps runs no step: raise strength or steps")
        # Like diffusers: the init image's size, rounded down to a multiple of 8, unless given.
        height = (pixels.shape[0] // VAE_MULTIPLE) * VAE_MULTIPLE
        width = (pixels.shape[1] // VAE_MULTIPLE) * VAE_MULTIPLE
        if width == 0 or height == 0 or max(pixels.shape[:2]) > limits.max_size * 4:
            raise InvalidArgument("init_image", f"{pixels.shape[1]}x{pixels.shape[0]}",
                                  f"image sides must be in [{VAE_MULTIPLE}, {limits.max_size * 4}] pixels")
        init_pixels = pixels[None]
    elif request.HasField("strength"):
        raise InvalidArgument("strength", request.strength, "only valid with init_image")
    else:
        width = height = model.default_size
    if request.HasField("width"):
        width = _check_size("width", request.width, limits)
    if request.HasField("height"):
        height = _check_size("height", request.height, limits)
    _check_size("width", width, limits)
    _check_size("height", height, limits)

    return GenerationPlan(
        request_id=request_id, model=model, prompt=request.prompt, negative_prompt=negative,
        width=width, height=height, steps=steps, scheduler=scheduler, guidance_scale=float(guidance),
        seeds=[seed + i for i in range(count)], init_pixels=init_pixels, strength=float(strength),
        output_format=request.output_format or common_pb2.PNG, quality=request.quality,
        clip_skip=clip_skip, literal_prompt=request.literal_prompt, **second,
    )
