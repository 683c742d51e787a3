"""The face part of a request's plan: reference photos, face detailing options with their
defaults, the base image. Pure Python: no gRPC, no models.

Defaults follow what ADetailer's and ComfyUI FaceDetailer's users know (confidence 0.3, dilate 4,
blur 4, strength 0.4) and PhotoMaker V2's (trigger word "img", start_merge_step 10, 2 identity
tokens per reference), with CFG 4 and 20 steps for the detailing pass. Everything a request can
get wrong is an InvalidArgument naming the field (`face_detailing.strength`, ...).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from diffmesh.errors import InvalidArgument
from diffmesh.imaging import decode_image
from diffmesh.models.timesteps import interpolate_timesteps, validate_timesteps
from diffmesh.proto.v1 import orchestrator_pb2

# PhotoMaker V2 makes 2 identity tokens per reference image; the class word is repeated once per token.
ID_TOKENS_PER_REFERENCE = 2
MAX_FACE_WEIGHT = 4
# A reference photo is only looked at for its face (and CLIP's 224-pixel view): it is decoded one
# at a time and kept at most this long side, so eight phone photos cost little more than one.
REFERENCE_MAX_SIDE = 1024
TRIGGER_WORD = re.compile(r"^\S+$")
MASK_SHAPES = {orchestrator_pb2.FACE_MASK_SHAPE_UNSPECIFIED: "ellipse", orchestrator_pb2.FACE_MASK_SHAPE_ELLIPSE: "ellipse",
               orchestrator_pb2.FACE_MASK_SHAPE_LANDMARKS: "landmarks"}


@dataclass(frozen=True)
class FaceDetailOptions:
    prompt: str                        # per-face prompts ([SEP] / [SKIP] / [PROMPT]); "" = the main prompt
    negative_prompt: str | None
    confidence: float = 0.3
    min_ratio: float = 0.0
    max_ratio: float = 1.0
    max_faces: int = 0
    padding: float = 0.5
    size: int = 1024
    max_magnification: float = 4.0
    mask_shape: str = "ellipse"
    mask_dilate: int = 4
    mask_blur: float = 4.0
    strength: float = 0.4
    guidance_scale: float = 4.0
    steps: int = 20
    scheduler: str = ""
    timesteps: list[int] | None = None
    start_merge_step: int = 10
    trigger_word: str = "img"
    face_model: str = ""
    identity_model: str = ""
    color_match: bool = True


@dataclass(frozen=True)
class FacePlan:
    """Present when the request asked for stage 2 (references or detail_faces)."""

    options: FaceDetailOptions
    references: list[np.ndarray]       # uint8 [H, W, 3] each, long side <= REFERENCE_MAX_SIDE
    face_weight: int
    base_pixels: np.ndarray | None     # uint8 [H, W, 3]: stage 1 is this photo, not a generation

    @property
    def with_identity(self) -> bool:
        return bool(self.references)

    @property
    def identity_tokens(self) -> int:
        """Class-word repeats in an identity prompt: 2 per reference, each reference counted face_weight times."""
        return len(self.references) * self.face_weight * ID_TOKENS_PER_REFERENCE


def _optional(message, name: str, default):
    return getattr(message, name) if message.HasField(name) else default


def _in_range(field: str, value: float, low: float, high: float, what: str = "") -> float:
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgument(field, value, f"must be in [{low:g}, {high:g}]{what}")
    return value


def _small(pixels: np.ndarray) -> np.ndarray:
    height, width = pixels.shape[:2]
    scale = REFERENCE_MAX_SIDE / max(height, width)
    if scale >= 1:
        return pixels
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.LANCZOS))


def plan_faces(request: orchestrator_pb2.GenerateRequest, default_size: int, max_steps: int, max_guidance: float,
               max_references: int, max_image_bytes: int, identity_models: dict[str, str | None],
               model_id: str) -> FacePlan | None:
    """The face plan of a request, or None when it asks for no face work. identity_models: the
    registry's identity encoders -> the pipeline each one's LoRA belongs to."""
    wants = bool(request.reference_faces) or request.detail_faces or bool(request.base_image) \
        or request.HasField("face_detailing") or request.HasField("face_weight")
    if not wants:
        return None
    if not (request.reference_faces or request.detail_faces):
        field = "base_image" if request.base_image else "face_detailing" if request.HasField("face_detailing") \
            else "face_weight"
        raise InvalidArgument(field, "set", "needs reference_faces or detail_faces (face detailing)")
    if request.base_image and request.init_image:
        raise InvalidArgument("base_image", f"{len(request.base_image)} bytes",
                              "give base_image (detail an existing photo) or init_image (img2img), not both")
    face_weight = _optional(request, "face_weight", 1)
    if not 1 <= face_weight <= MAX_FACE_WEIGHT:
        raise InvalidArgument("face_weight", face_weight, f"must be in [1, {MAX_FACE_WEIGHT}]")
    if request.HasField("face_weight") and not request.reference_faces:
        raise InvalidArgument("face_weight", face_weight, "only valid with reference_faces")
    if len(request.reference_faces) * face_weight > max_references:
        raise InvalidArgument("reference_faces", len(request.reference_faces),
                              f"at most {max_references} references, face_weight repeats included "
                              f"({len(request.reference_faces)} x {face_weight})")
    references = [_small(decode_image(data, f"reference_faces[{i}]", max_image_bytes))
                  for i, data in enumerate(request.reference_faces)]
    base = decode_image(request.base_image, "base_image", max_image_bytes) if request.base_image else None
    options = _options(request.face_detailing, default_size, max_steps, max_guidance)
    if references:
        options = _identity_model(options, identity_models, model_id)
    return FacePlan(options=options, references=references, face_weight=face_weight, base_pixels=base)


def _identity_model(options: FaceDetailOptions, identity_models: dict[str, str | None],
                    model_id: str) -> FaceDetailOptions:
    field = "face_detailing.identity_model"
    usable = sorted(i for i, base in identity_models.items() if base == model_id)
    chosen = options.identity_model or (usable[0] if usable else "")
    if not chosen:
        raise InvalidArgument("reference_faces", "set", f"model {model_id} has no identity encoder in the registry "
                                                        f"(identity_encoder entries with base: {model_id})")
    if chosen not in identity_models:
        raise InvalidArgument(field, chosen, f"unknown identity encoder; known: {', '.join(sorted(identity_models))}")
    if identity_models[chosen] != model_id:
        raise InvalidArgument(field, chosen, f"is for model {identity_models[chosen]}, not {model_id}")
    return _replace(options, identity_model=chosen)


def _replace(options: FaceDetailOptions, **changes) -> FaceDetailOptions:
    from dataclasses import replace
    return replace(options, **changes)


def _options(message: orchestrator_pb2.FaceDetailing, default_size: int, max_steps: int,
             max_guidance: float) -> FaceDetailOptions:
    f = "face_detailing."
    steps = _optional(message, "steps", 20)
    if not 1 <= steps <= max_steps:
        raise InvalidArgument(f + "steps", steps, f"must be in [1, {max_steps}]")
    timesteps = None
    if message.timestep_anchors:
        anchors = validate_timesteps(message.timestep_anchors, field=f + "timestep_anchors")
        timesteps = interpolate_timesteps(steps, anchors)
    strength = _in_range(f + "strength", _optional(message, "strength", 0.4), 0.0, 1.0)
    if strength > 0 and int(steps * strength) < 1:
        raise InvalidArgument(f + "strength", strength, f"with {steps} steps runs no step: raise strength or steps")
    if message.HasField("start_merge_step") and message.HasField("style_strength"):
        raise InvalidArgument(f + "style_strength", message.style_strength, "give start_merge_step or style_strength, "
                                                                            "not both")
    merge = _optional(message, "start_merge_step", min(10, steps))  # PhotoMaker's 10, within short schedules
    if message.HasField("style_strength"):
        style = _in_range(f + "style_strength", message.style_strength, 0.0, 100.0, " (percent)")
        merge = int(style / 100.0 * steps)
    if not -1 <= merge <= steps:
        raise InvalidArgument(f + "start_merge_step", merge, f"must be in [-1, steps={steps}]")
    trigger = message.trigger_word or "img"
    if not TRIGGER_WORD.match(trigger) or len(trigger) > 32:
        raise InvalidArgument(f + "trigger_word", trigger, "one word without spaces, at most 32 characters")
    if message.mask_shape not in MASK_SHAPES:
        raise InvalidArgument(f + "mask_shape", message.mask_shape,
                              f"must be one of {', '.join(orchestrator_pb2.FaceMaskShape.keys())}")
    size = _optional(message, "size", default_size)
    if size < 64 or size % 8 or size > 2048:
        raise InvalidArgument(f + "size", size, "must be a multiple of 8 in [64, 2048]")
    min_ratio = _in_range(f + "min_ratio", _optional(message, "min_ratio", 0.0), 0.0, 1.0)
    max_ratio = _in_range(f + "max_ratio", _optional(message, "max_ratio", 1.0), 0.0, 1.0)
    if min_ratio > max_ratio:
        raise InvalidArgument(f + "min_ratio", min_ratio, f"exceeds max_ratio {max_ratio}")
    if not 0 <= message.max_faces <= 64:
        raise InvalidArgument(f + "max_faces", message.max_faces, "must be in [0, 64] (0: all)")
    dilate = _optional(message, "mask_dilate", 4)
    if not -64 <= dilate <= 64:
        raise InvalidArgument(f + "mask_dilate", dilate, "must be in [-64, 64] pixels (negative erodes)")
    return FaceDetailOptions(
        prompt=message.prompt, negative_prompt=_optional(message, "negative_prompt", None),
        confidence=_in_range(f + "confidence", _optional(message, "confidence", 0.3), 0.0, 1.0),
        min_ratio=min_ratio, max_ratio=max_ratio, max_faces=message.max_faces,
        padding=_in_range(f + "padding", _optional(message, "padding", 0.5), 0.0, 4.0),
        size=size,
        max_magnification=_in_range(f + "max_magnification", _optional(message, "max_magnification", 4.0), 1.0, 16.0),
        mask_shape=MASK_SHAPES[message.mask_shape], mask_dilate=dilate,
        mask_blur=_in_range(f + "mask_blur", _optional(message, "mask_blur", 4.0), 0.0, 64.0, " pixels"),
        strength=strength,
        guidance_scale=_in_range(f + "guidance_scale", _optional(message, "guidance_scale", 4.0), 0.0, max_guidance),
        steps=steps, scheduler=message.scheduler, timesteps=timesteps, start_merge_step=merge,
        trigger_word=trigger, face_model=message.face_model, identity_model=message.identity_model,
        color_match=_optional(message, "color_match", True))
