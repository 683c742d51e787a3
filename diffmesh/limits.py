"""The request limits, declared once: the orchestrator validates against them and every stage
re-checks what it receives against the same settings, so a stage called directly (a buggy caller,
a misconfigured NetworkPolicy) refuses what the orchestrator would have refused, with the same
bound and the same default.

Each mixin is one concern; a service's config inherits the ones it enforces (a setting a stage
would not use is not one of its settings, so an unknown DIFFMESH_* variable still fails start-up):

    orchestrator   ImageSize, Steps, Batch, Prompt, ImageMemory, Face
    text_encoder   Prompt, TokenWindows
    denoiser       ImageSize, Steps, Batch, TokenWindows
    vae            ImageSize, Batch, ImageMemory
    face           ImageSize, Batch, ImageMemory, Face
"""
from __future__ import annotations

from dataclasses import dataclass

from diffmesh.runtime.config import setting

MIB = 1024 * 1024
# CLIP's window: 75 prompt tokens + BOS + EOS. A prompt of k windows is [1, 77k, D].
TOKENS_PER_WINDOW = 77
# An init image may be up to this many times max_size per side: the vae resizes it to the output
# size (at most max_size), as diffusers' img2img does.
INIT_IMAGE_SIDE_FACTOR = 4
# Largest inpaint-mask feather radius, pixels (a gaussian this wide is already a soft gradient).
MAX_FEATHER = 256.0


@dataclass
class ImageSizeLimits:
    max_size: int = setting(2048, "largest width or height accepted, pixels (the orchestrator and every "
                                  "stage that makes or reads images)", min=8)


@dataclass
class StepLimits:
    max_steps: int = setting(150, "most steps (or custom timesteps) one request may ask for", min=1)


@dataclass
class BatchLimits:
    max_batch: int = setting(16, "most images one stage call may denoise, decode or encode (the "
                                 "orchestrator's max_count must not exceed it)", min=1)


@dataclass
class PromptLimits:
    max_prompt_chars: int = setting(4000, "longest prompt (and negative / second prompt) accepted, characters",
                                    min=1)


@dataclass
class TokenWindowLimits:
    max_prompt_windows: int = setting(
        32, "most 77-token CLIP windows a prompt may take (the text encoder counts them; the denoiser "
            "refuses longer embeddings): bounds encoder and cross-attention cost", min=1)

    @property
    def max_sequence(self) -> int:
        """Longest embedding sequence a stage accepts: max_prompt_windows windows of 77 tokens."""
        return self.max_prompt_windows * TOKENS_PER_WINDOW


@dataclass
class ImageMemoryLimits:
    max_image_decode_mb: int = setting(
        160, "peak memory one image may take to decode or to receive as pixels, MiB (computed from the "
             "file's header before decoding: see diffmesh.imaging.decode_cost)", min=1)

    @property
    def max_image_decode_bytes(self) -> int:
        return self.max_image_decode_mb * MIB


@dataclass
class FaceLimits:
    max_reference_faces: int = setting(8, "most reference photos one request may give (the face_weight "
                                          "repeats included: each adds identity tokens to the prompt)", min=1)
    max_detected_faces: int = setting(32, "most faces one image's analysis returns (highest scores first)",
                                      min=1)
