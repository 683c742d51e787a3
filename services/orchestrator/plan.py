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
from PIL import Image

from diffmesh.imaging import DEFAULT_DECODE_BUDGET, FORMATS, decode_image
from diffmesh.limits import INIT_IMAGE_SIDE_FACTOR, MAX_FEATHER
from diffmesh.models.latent_space import vae_scale_factor
from diffmesh.models.registry import ModelEntry, ModelFamily, Registry
from diffmesh.models.schedulers import require_scheduler, scheduler_overrides
from diffmesh.models.timesteps import interpolate_timesteps, validate_timesteps
from diffmesh.proto.v1 import common_pb2, orchestrator_pb2
from diffmesh.errors import InvalidArgument
from services.orchestrator.face_plan import FacePlan, plan_faces

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
    # Peak memory one image file may take to decode (diffmesh.imaging.decode_cost): judged from
    # the header, so a small file that inflates is refused before it is decoded. A request decodes
    # at most two (init image, then mask or change map while the init pixels, at most 3/10 of
    # this, are kept): its images peak below 1.3 x this, besides the request message.
    max_image_decode_bytes: int = DEFAULT_DECODE_BUDGET
    max_reference_faces: int = 8


@dataclass(frozen=True)
class CatalogModel:
    entry: ModelEntry
    default_size: int  # the UNet's sample_size in pixels (512 for SD 1.5, 1024 for SDXL)

    @property
    def family(self) -> ModelFamily:
        return self.entry.family


class ModelCatalog:
    """What the orchestrator knows of each model without loading it: family and default size."""

    # Only pipelines have a catalog entry (family, default size); face packs, adapters and
    # policies belong to the stages that load them and must not stop the orchestrator.
    KINDS = ("pipeline",)

    def __init__(self, registry: Registry) -> None:
        self._models: dict[str, CatalogModel] = {}
        # Identity encoders by id -> the pipeline their LoRA belongs to: read from the registry
        # file only (the face stage and the denoiser load them; their paths are not checked here).
        self.identity_models: dict[str, str | None] = {
            model_id: registry.specs[model_id].base for model_id in registry.ids(kinds=("identity_encoder",))}
        registry.verify(kinds=self.KINDS)
        for entry in registry.entries(kinds=self.KINDS):
            unet = json.loads((entry.component_dir("unet") / "config.json").read_text())
            vae = json.loads((entry.component_dir("vae") / "config.json").read_text())
            scale = vae_scale_factor(vae)
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
    timesteps: list[int] | None = None
    timestep_spacing: str = ""
    sigma_schedule: str = ""
    guidance_rescale: float = 0.0
    change_map: np.ndarray | None = None  # uint8 [1, H, W] at the output size
    change_map_is_mask: bool = False
    mask_feather: float = 0.0
    paste_back: bool = False
    preview_every: int = 0
    faces: FacePlan | None = None  # two-stage face detailing / identity

    @property
    def keep_mask(self) -> np.ndarray | None:
        """uint8 [1, H, W]: 1 where paste-back restores the init image (the map keeps the pixel)."""
        if not self.paste_back or self.change_map is None:
            return None
        kept = self.change_map <= 127 if self.change_map_is_mask else self.change_map == 0
        return kept.astype(np.uint8)

    @property
    def paste_pixels(self) -> np.ndarray | None:
        """The init image at the output size (resized as diffusers' VaeImageProcessor does)."""
        if self.keep_mask is None:
            return None
        pixels = self.init_pixels[0]
        if pixels.shape[:2] != (self.height, self.width):
            pixels = np.asarray(Image.fromarray(pixels).resize((self.width, self.height), Image.LANCZOS))
        return pixels[None]

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


def requested_model(request: orchestrator_pb2.GenerateRequest, limits: Limits, catalog: ModelCatalog) -> str:
    """The model id a request runs with: its own, else the default model, else the first in the catalog."""
    ids = catalog.ids()
    return request.model or limits.default_model or (ids[0] if ids else "")


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

    model_id = requested_model(request, limits, catalog)
    model = catalog.get(model_id)
    if model is None:
        raise InvalidArgument("model", model_id, f"unknown model; known: {', '.join(catalog.ids())}")
    for name, value in second.items():
        if model.family != ModelFamily.SDXL and value:
            raise InvalidArgument(name, value, f"only SDXL models have a second text encoder ({model_id} is "
                                               f"{model.family.value})")

    scheduler = request.scheduler or limits.default_scheduler
    spec = require_scheduler(scheduler)
    steps, timesteps = _schedule(request, limits)
    scheduler_overrides(spec, request.timestep_spacing, request.sigma_schedule, custom_timesteps=timesteps is not None)
    guidance_rescale = request.guidance_rescale if request.HasField("guidance_rescale") else 0.0
    if not math.isfinite(guidance_rescale) or not 0.0 <= guidance_rescale <= 1.0:
        raise InvalidArgument("guidance_rescale", guidance_rescale, "must be in [0, 1]")
    if not 0 <= request.preview_every <= steps:
        raise InvalidArgument("preview_every", request.preview_every, f"must be in [0, steps={steps}] (0: none)")

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

    init_pixels, strength, change_map = None, 0.0, None
    if not request.init_image:
        for name in ("change_map", "mask"):
            if getattr(request, name):
                raise InvalidArgument(name, f"{len(getattr(request, name))} bytes", "needs init_image")
    if request.init_image:
        if len(request.init_image) > limits.max_init_image_bytes:
            raise InvalidArgument("init_image", f"{len(request.init_image)} bytes",
                                  f"larger than {limits.max_init_image_bytes} bytes")
        pixels = decode_image(request.init_image, "init_image", limits.max_image_decode_bytes)
        change_map = _change_map(request, pixels.shape[:2], limits)
        default_strength = 1.0 if change_map is not None else limits.default_strength
        strength = request.strength if request.HasField("strength") else default_strength
        if not math.isfinite(strength) or not 0.0 < strength <= 1.0:
            raise InvalidArgument("strength", strength, "must be in (0, 1]")
        if int(steps * strength) < 1:
            raise InvalidArgument("strength", strength, f"with {steps} steps runs no step: raise strength or steps")
        # Like diffusers: the init image's size, rounded down to a multiple of 8, unless given.
        height = (pixels.shape[0] // VAE_MULTIPLE) * VAE_MULTIPLE
        width = (pixels.shape[1] // VAE_MULTIPLE) * VAE_MULTIPLE
        max_side = limits.max_size * INIT_IMAGE_SIDE_FACTOR
        if width == 0 or height == 0 or max(pixels.shape[:2]) > max_side:
            raise InvalidArgument("init_image", f"{pixels.shape[1]}x{pixels.shape[0]}",
                                  f"image sides must be in [{VAE_MULTIPLE}, {max_side}] pixels")
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
    if change_map is not None and change_map.shape != (height, width):
        change_map = np.asarray(Image.fromarray(change_map).resize((width, height), Image.BILINEAR))
    if request.paste_back and change_map is None:
        raise InvalidArgument("paste_back", True, "needs a change_map or a mask")
    feather = request.mask_feather if request.HasField("mask_feather") else 0.0
    if request.HasField("mask_feather") and not request.mask:
        raise InvalidArgument("mask_feather", feather, "only valid with mask")
    if not math.isfinite(feather) or not 0.0 <= feather <= MAX_FEATHER:
        raise InvalidArgument("mask_feather", feather, f"must be in [0, {MAX_FEATHER:g}] pixels")

    faces = plan_faces(request, model.default_size, limits.max_steps, limits.max_guidance,
                       limits.max_reference_faces, limits.max_image_decode_bytes, catalog.identity_models, model_id)
    if faces is not None:
        _check_faces(faces, limits)
        if faces.base_pixels is not None:
            base_h, base_w = faces.base_pixels.shape[:2]
            if max(base_w, base_h) > limits.max_size * INIT_IMAGE_SIDE_FACTOR:
                raise InvalidArgument("base_image", f"{base_w}x{base_h}", f"image sides must be at most "
                                                                        f"{limits.max_size * INIT_IMAGE_SIDE_FACTOR}")
            width, height = base_w, base_h  # stage 1 is the photo as it is

    return GenerationPlan(
        request_id=request_id, model=model, prompt=request.prompt, negative_prompt=negative,
        width=width, height=height, steps=steps, scheduler=scheduler, guidance_scale=float(guidance),
        seeds=[seed + i for i in range(count)], init_pixels=init_pixels, strength=float(strength),
        output_format=request.output_format or common_pb2.PNG, quality=request.quality,
        clip_skip=clip_skip, literal_prompt=request.literal_prompt, **second,
        timesteps=timesteps, timestep_spacing=request.timestep_spacing, sigma_schedule=request.sigma_schedule,
        guidance_rescale=float(guidance_rescale), change_map=None if change_map is None else change_map[None],
        change_map_is_mask=bool(request.mask), mask_feather=float(feather), paste_back=request.paste_back,
        preview_every=request.preview_every, faces=faces,
    )


def _check_faces(faces: FacePlan, limits: Limits) -> None:
    options = faces.options
    for name in ("prompt", "negative_prompt"):
        text = getattr(options, name)
        if text is not None:
            _check_prompt(f"face_detailing.{name}", text, limits, required=False)
    if options.scheduler:
        spec = require_scheduler(options.scheduler, "face_detailing.scheduler")
        scheduler_overrides(spec, "", "", custom_timesteps=options.timesteps is not None)


def _schedule(request: orchestrator_pb2.GenerateRequest, limits: Limits) -> tuple[int, list[int] | None]:
    """Steps and the explicit timesteps, if any (given, or interpolated from anchors)."""
    steps = request.steps if request.HasField("steps") else None
    if request.timesteps and request.timestep_anchors:
        raise InvalidArgument("timestep_anchors", list(request.timestep_anchors), "give timesteps or anchors, not both")
    if request.timesteps:
        timesteps = validate_timesteps(request.timesteps)
        if len(timesteps) > limits.max_steps:
            raise InvalidArgument("timesteps", f"{len(timesteps)} timesteps", f"at most {limits.max_steps}")
        if steps is not None and steps != len(timesteps):
            raise InvalidArgument("steps", steps, f"must be unset or len(timesteps) = {len(timesteps)}")
        return len(timesteps), timesteps
    steps = limits.default_steps if steps is None else steps
    if not 1 <= steps <= limits.max_steps:
        raise InvalidArgument("steps", steps, f"must be in [1, {limits.max_steps}]")
    if request.timestep_anchors:
        anchors = validate_timesteps(request.timestep_anchors, field="timestep_anchors")
        return steps, interpolate_timesteps(steps, anchors)
    return steps, None


def _change_map(request: orchestrator_pb2.GenerateRequest, size: tuple[int, int],
                limits: Limits) -> np.ndarray | None:
    """The change map or mask as uint8 [H, W], checked against the init image's size."""
    if request.change_map and request.mask:
        raise InvalidArgument("mask", f"{len(request.mask)} bytes", "give change_map or mask, not both")
    name = "change_map" if request.change_map else "mask" if request.mask else None
    if name is None:
        return None
    grey = np.asarray(Image.fromarray(decode_image(getattr(request, name), name, limits.max_image_decode_bytes))
                      .convert("L"))
    if grey.shape != size:
        raise InvalidArgument(f"{name}.shape", f"{grey.shape[1]}x{grey.shape[0]}",
                              f"must match init_image's size {size[1]}x{size[0]}")
    return grey
