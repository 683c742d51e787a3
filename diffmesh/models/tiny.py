"""Deterministic tiny SD 1.x / SDXL pipelines for dev, demos and tests.

Same formats, component classes, schedulers and tokenizer as the real models, random weights from
fixed seeds, a few MB each. The VAE keeps 4 blocks so the latent scale factor stays 8 (shape logic
in the mesh is then identical to production); the text encoders keep the full 49408-token
vocabulary and 77 positions so prompt handling is exercised for real.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from diffmesh.models.clip_vocab import EOS_TOKEN, VOCAB_SIZE, write_clip_tokenizer
from diffmesh.models.registry import write_registry

SD15_ID = "tiny-sd15"
SDXL_ID = "tiny-sdxl"
REGISTRY_FILE = "registry.yaml"

# One seed per component: changing one component's config never reshuffles another's weights.
_SEEDS = {
    "text_encoder": 1,
    "text_encoder_2": 2,
    "unet": 3,
    "vae": 4,
}

_BETAS: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "trained_betas": None,
}

# The schedulers shipped with runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-
# base-1.0: sampling behaviour (offsets, spacing) is what the mesh must match, weights aside.
SD15_SCHEDULER: dict[str, Any] = {
    **_BETAS,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
SDXL_SCHEDULER: dict[str, Any] = {
    **_BETAS,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}


def _seeded(component: str) -> None:
    import torch

    torch.manual_seed(_SEEDS[component])


def _clip_text_config(
    hidden: int, projection_dim: int, pad_token_id: int, hidden_act: str = "quick_gelu"
) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=77,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=projection_dim,
        hidden_act=hidden_act,
        # Real token ids, so pooling (first EOS position) finds the real end-of-text token.
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
    )


def _vae(scaling_factor: float, sample_size: int, force_upcast: bool) -> Any:
    from diffusers import AutoencoderKL

    _seeded("vae")
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def _unet(sample_size: int, cross_attention_dim: int, sdxl: bool) -> Any:
    from diffusers import UNet2DConditionModel

    extra: dict[str, Any] = {}
    if sdxl:
        # text_time: pooled text_encoder_2 embeds (32) + 6 micro-conditioning ids x 8 = 80.
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,
            use_linear_projection=True,
        )
    _seeded("unet")
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
        **extra,
    )
    _sharpen_cross_attention(unet)
    return unet


# With default init, cross-attention logits are tiny, so every latent pixel averages all 77 text
# positions (mostly padding) and a one-word prompt change moves ~0.5 % of pixels by more than 1/255.
# Tests of prompt routing, weighting, negative prompts and identity-token fusion need prompts to
# show in the pixels: scaling q/k sharpens attention, scaling the output raises its share of the
# residual (measured: "cat" vs "dog" then changes >50 % of pixels; images stay varied and batch vs
# single still differ by <= 1).
_CROSS_ATTN_QK_SCALE = 8.0
_CROSS_ATTN_OUT_SCALE = 4.0


def _sharpen_cross_attention(unet: Any) -> None:
    import torch

    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):  # attn1 is self-attention, attn2 attends to the text
                module.to_q.weight.mul_(_CROSS_ATTN_QK_SCALE)
                module.to_k.weight.mul_(_CROSS_ATTN_QK_SCALE)
                module.to_out[0].weight.mul_(_CROSS_ATTN_OUT_SCALE)


def _build_sd15(out: Path) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    tok_dir = write_clip_tokenizer(out / "_tok", pad_token=EOS_TOKEN)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    _seeded("text_encoder")
    text_encoder = CLIPTextModel(_clip_text_config(32, 32, pad_token_id=49407))
    pipe = StableDiffusionPipeline(
        vae=_vae(0.18215, sample_size=64, force_upcast=True),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=_unet(sample_size=8, cross_attention_dim=32, sdxl=False),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(tok_dir)
    _replace_tokenizer(out / "tokenizer", EOS_TOKEN)


def _build_sdxl(out: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tok_dir = write_clip_tokenizer(out / "_tok", pad_token=EOS_TOKEN)
    tok2_dir = write_clip_tokenizer(out / "_tok2", pad_token="!")
    _seeded("text_encoder")
    text_encoder = CLIPTextModel(_clip_text_config(16, 16, pad_token_id=49407))
    _seeded("text_encoder_2")
    # As in SDXL's OpenCLIP bigG encoder: pads with "!" (id 0), gelu rather than quick_gelu.
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_text_config(32, 32, pad_token_id=0, hidden_act="gelu")
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(0.13025, sample_size=128, force_upcast=True),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        tokenizer_2=CLIPTokenizer.from_pretrained(tok2_dir),
        # 16 + 32: the two encoders' penultimate hidden states are concatenated.
        unet=_unet(sample_size=16, cross_attention_dim=48, sdxl=True),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        # The mesh's safety stage watermarks; the pipeline must not, whatever is installed.
        add_watermarker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(tok_dir)
    shutil.rmtree(tok2_dir)
    _replace_tokenizer(out / "tokenizer", EOS_TOKEN)
    _replace_tokenizer(out / "tokenizer_2", "!")


def _replace_tokenizer(dir: Path, pad_token: str) -> None:
    # transformers 5's own save writes only a 3.6 MB tokenizer.json (no vocab.json / merges.txt)
    # whose content may drift between releases; the classic four files are a third the size,
    # byte-stable across versions, and load with CLIPTokenizer.from_pretrained all the same.
    shutil.rmtree(dir)
    write_clip_tokenizer(dir, pad_token=pad_token)


def _make_world_readable(tree: Path) -> None:
    # mkdtemp creates 0700 and the transformers/diffusers writers leave weights 0600; services that
    # mount the built set as another user must still be able to read it.
    os.chmod(tree, 0o755)
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


def build_tiny_models(root: Path) -> dict[str, Path]:
    """Build tiny-sd15 and tiny-sdxl under ``root`` and register them in ``root/registry.yaml``.

    Each set is built in a scratch directory and renamed into place, so an interrupted build never
    leaves a half-written model that a service would try to load.
    """
    import torch

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    builders = {SD15_ID: _build_sd15, SDXL_ID: _build_sdxl}
    built: dict[str, Path] = {}
    # Seeding mutates the global RNG; restore it so callers' own randomness is unaffected.
    rng_state = torch.random.get_rng_state()
    try:
        for model_id, build in builders.items():
            final = root / model_id
            scratch = Path(tempfile.mkdtemp(prefix=f".{model_id}.", dir=root))
            try:
                build(scratch)
                _make_world_readable(scratch)
                if final.exists():
                    shutil.rmtree(final)
                scratch.rename(final)
            except BaseException:
                shutil.rmtree(scratch, ignore_errors=True)
                raise
            built[model_id] = final
    finally:
        torch.random.set_rng_state(rng_state)
    write_registry(root / REGISTRY_FILE, built)
    _build_face_models(root)
    return built


FACE_PACK_ID = "faces"                  # the embedded default: dlib with PyPI's real weights (128-d)
TINY_ARCFACE_PACK_ID = "faces-tiny-arcface"  # tiny ONNX models run by insightface's own code (512-d)
# Tiny PhotoMaker V2 identity encoders for tiny-sdxl, one per face pack's embedding size (the
# identity encoder is configured for the dimension its face pack gives).
IDENTITY_IDS = {"photomaker-tiny": 128, "photomaker-tiny-arcface": 512}


def _build_face_models(root: Path) -> None:
    """The face stage's models: the dlib pack (real weights, links into face_recognition_models)
    and the tiny insightface pack, registered as face_analysis entries."""
    from diffmesh.models.face_packs import build_dlib_pack, build_tiny_insightface_pack
    from diffmesh.models.registry import Kind, RegistryItem

    items = {FACE_PACK_ID: RegistryItem(build_dlib_pack(root / FACE_PACK_ID), Kind.FACE_ANALYSIS),
             TINY_ARCFACE_PACK_ID: RegistryItem(build_tiny_insightface_pack(root / TINY_ARCFACE_PACK_ID),
                                                Kind.FACE_ANALYSIS)}
    items.update(_build_identity_encoders(root))
    for item in items.values():
        if Path(item.path).is_dir():
            _make_world_readable(Path(item.path))
        else:
            os.chmod(item.path, 0o644)
        sidecar = Path(str(item.path) + ".json")
        if sidecar.exists():
            os.chmod(sidecar, 0o644)
    write_registry(root / REGISTRY_FILE, items)


def _build_identity_encoders(root: Path) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    from diffmesh.models.photomaker import build_tiny_photomaker
    from diffmesh.models.registry import Kind, RegistryItem

    unet = UNet2DConditionModel.from_pretrained(root / SDXL_ID / "unet")
    cross = int(unet.config.cross_attention_dim)
    return {model_id: RegistryItem(build_tiny_photomaker(root / f"{model_id}.bin", unet, dim, cross, seed=i),
                                   Kind.IDENTITY_ENCODER, base=SDXL_ID)
            for i, (model_id, dim) in enumerate(IDENTITY_IDS.items())}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build the deterministic tiny model set.")
    parser.add_argument("root", type=Path, help="output folder (registry.yaml is written there)")
    args = parser.parse_args(argv)
    for model_id, path in build_tiny_models(args.root).items():
        print(f"{model_id}\t{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
