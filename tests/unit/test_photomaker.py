"""PhotoMaker V2: published key layout, checkpoint I/O, identity fusion, CLIP preprocessing, UNet LoRA."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmesh.errors import InvalidArgument
from diffmesh.models import photomaker as pm
from diffmesh.models.registry import Kind, ModelEntry, ModelError

ID_DIM = 128    # dlib-sized identity embeddings
CROSS_DIM = 48  # tiny SDXL: 16 + 32

# The published id_encoder key layout (DEPENDENCIES.md, "PhotoMaker V2"), layer indices as N.
_W, _WB = ("weight",), ("weight", "bias")
_PUBLISHED_PATTERNS = {
    "vision_model.embeddings.class_embedding",
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.embeddings.position_embedding.weight",
    *(f"vision_model.{m}.{p}" for m in ("pre_layrnorm", "post_layernorm") for p in _WB),
    *(f"vision_model.encoder.layers.N.self_attn.{x}_proj.{p}" for x in "qkv" for p in _WB),
    *(f"vision_model.encoder.layers.N.self_attn.out_proj.{p}" for p in _WB),
    *(f"vision_model.encoder.layers.N.{m}.{p}"
      for m in ("layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2") for p in _WB),
    "visual_projection.weight",
    "visual_projection_2.weight",
    *(f"fuse_module.{mlp}.{m}.{p}" for mlp in ("mlp1", "mlp2") for m in ("layernorm", "fc1", "fc2") for p in _WB),
    *(f"fuse_module.layer_norm.{p}" for p in _WB),
    *(f"qformer_perceiver.token_proj.{i}.{p}" for i in (0, 2) for p in _WB),
    *(f"qformer_perceiver.token_norm.{p}" for p in _WB),
    *(f"qformer_perceiver.perceiver_resampler.{m}.{p}" for m in ("proj_in", "proj_out", "norm_out") for p in _WB),
    *(f"qformer_perceiver.perceiver_resampler.layers.N.0.{m}.{p}" for m in ("norm1", "norm2") for p in _WB),
    *(f"qformer_perceiver.perceiver_resampler.layers.N.0.{m}.weight" for m in ("to_q", "to_kv", "to_out")),
    *(f"qformer_perceiver.perceiver_resampler.layers.N.1.0.{p}" for p in _WB),
    "qformer_perceiver.perceiver_resampler.layers.N.1.1.weight",
    "qformer_perceiver.perceiver_resampler.layers.N.1.3.weight",
}


def _pattern(key: str) -> str:
    return re.sub(r"\.layers\.\d+\.", ".layers.N.", key)


@pytest.fixture(scope="module")
def tiny_unet():
    from diffmesh.models.tiny import _unet

    return _unet(sample_size=16, cross_attention_dim=CROSS_DIM, sdxl=True).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_unet) -> Path:
    path = tmp_path_factory.mktemp("pm") / "photomaker-tiny.bin"
    return pm.build_tiny_photomaker(path, tiny_unet, ID_DIM, CROSS_DIM, seed=7)


@pytest.fixture(scope="module")
def encoder(checkpoint) -> pm.IdentityEncoder:
    return pm.IdentityEncoder.load(checkpoint, "cpu", torch.float32, model_id="pm")


def _images(seed: int = 0, k: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(200, 300, 3), (256, 240, 3), (180, 180, 3)]
    return [rng.integers(0, 256, shapes[i % 3], dtype=np.uint8) for i in range(k)]


# --- (a) layout and checkpoint I/O ------------------------------------------------------------


def test_published_config_has_the_published_463_tensors():
    config = pm.PhotoMakerConfig.published()
    assert (config.vision_hidden_size, config.vision_intermediate_size, config.vision_num_heads,
            config.vision_num_layers, config.projection_dim, config.id_embeddings_dim,
            config.cross_attention_dim, config.perceiver_dim_head, config.perceiver_heads) == \
        (1024, 4096, 16, 24, 768, 512, 2048, 128, 16)
    with torch.device("meta"):
        encoder = pm.PhotoMakerV2IdEncoder(config)
    state = encoder.state_dict()
    assert len(state) == 463
    assert 540e6 < sum(p.numel() for p in encoder.parameters()) < 546e6  # ~543 M
    assert {_pattern(k) for k in state} == _PUBLISHED_PATTERNS
    shapes = {
        "vision_model.embeddings.class_embedding": (1024,),
        "vision_model.embeddings.patch_embedding.weight": (1024, 3, 14, 14),
        "vision_model.embeddings.position_embedding.weight": (257, 1024),
        "vision_model.pre_layrnorm.weight": (1024,),
        "vision_model.encoder.layers.23.self_attn.q_proj.weight": (1024, 1024),
        "vision_model.encoder.layers.0.mlp.fc1.weight": (4096, 1024),
        "vision_model.post_layernorm.bias": (1024,),
        "visual_projection.weight": (768, 1024),
        "visual_projection_2.weight": (1280, 1024),
        "qformer_perceiver.token_proj.0.weight": (2048, 512),
        "qformer_perceiver.token_proj.2.weight": (4096, 2048),
        "qformer_perceiver.token_norm.weight": (2048,),
        "qformer_perceiver.perceiver_resampler.proj_in.weight": (2048, 1024),
        "qformer_perceiver.perceiver_resampler.layers.3.0.to_q.weight": (2048, 2048),
        "qformer_perceiver.perceiver_resampler.layers.3.0.to_kv.weight": (4096, 2048),
        "qformer_perceiver.perceiver_resampler.layers.0.1.1.weight": (8192, 2048),
        "qformer_perceiver.perceiver_resampler.layers.0.1.3.weight": (2048, 8192),
        "fuse_module.mlp1.fc1.weight": (2048, 4096),
        "fuse_module.mlp2.fc2.weight": (2048, 2048),
        "fuse_module.layer_norm.weight": (2048,),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert "vision_model.embeddings.position_ids" not in state  # a non-persistent buffer


def test_tiny_encoder_has_the_published_key_layout():
    config = pm.tiny_photomaker_config(ID_DIM, CROSS_DIM)
    assert (config.image_size, config.patch_size, config.num_tokens, config.perceiver_depth) == (224, 14, 2, 4)
    with torch.device("meta"):
        state = pm.PhotoMakerV2IdEncoder(config).state_dict()
    assert {_pattern(k) for k in state} == _PUBLISHED_PATTERNS
    # Only the vision depth differs from the published count: 16 tensors per vision layer.
    assert len(state) == 463 - 16 * (24 - config.vision_num_layers)


def test_checkpoint_round_trip_is_strict_and_exact(checkpoint, tiny_unet):
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert list(raw) == ["id_encoder", "lora_weights"]
    assert pm.sidecar_path(checkpoint).is_file()
    encoder, lora, config = pm.load_photomaker_checkpoint(checkpoint, "cpu", torch.float32)
    assert config == pm.tiny_photomaker_config(ID_DIM, CROSS_DIM)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    loaded = encoder.state_dict()
    assert loaded.keys() == raw["id_encoder"].keys()
    assert all(torch.equal(loaded[k], raw["id_encoder"][k]) for k in loaded)
    assert lora.keys() == raw["lora_weights"].keys()
    # Deterministic: the same seed rebuilds the same bytes' worth of tensors.
    again = pm.build_tiny_photomaker(checkpoint.parent / "again.bin", tiny_unet, ID_DIM, CROSS_DIM, seed=7)
    raw2 = torch.load(again, map_location="cpu", weights_only=True)
    assert all(torch.equal(raw2["id_encoder"][k], v) for k, v in raw["id_encoder"].items())
    assert all(torch.equal(raw2["lora_weights"][k], v) for k, v in raw["lora_weights"].items())
    # Saving the loaded encoder again loads back identically.
    resaved = pm.save_photomaker_checkpoint(checkpoint.parent / "resaved.bin", encoder, lora, config)
    encoder2, _, config2 = pm.load_photomaker_checkpoint(resaved)
    assert config2 == config
    assert all(torch.equal(encoder2.state_dict()[k], v) for k, v in loaded.items())


def _write(path: Path, payload, sidecar_from: Path | None = None) -> Path:
    torch.save(payload, path)
    if sidecar_from is not None:
        pm.sidecar_path(path).write_text(pm.sidecar_path(sidecar_from).read_text())
    return path


def test_missing_and_extra_keys_are_named(checkpoint, tmp_path):
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    missing = dict(raw["id_encoder"])
    del missing["fuse_module.mlp2.fc1.bias"]
    path = _write(tmp_path / "missing.bin", {"id_encoder": missing, "lora_weights": raw["lora_weights"]}, checkpoint)
    with pytest.raises(ModelError, match=r"missing 1 keys \(fuse_module\.mlp2\.fc1\.bias\)"):
        pm.load_photomaker_checkpoint(path)

    extra = {**raw["id_encoder"], "qformer_perceiver.extra.weight": torch.zeros(2)}
    path = _write(tmp_path / "extra.bin", {"id_encoder": extra, "lora_weights": raw["lora_weights"]}, checkpoint)
    with pytest.raises(ModelError, match=r"unexpected 1 keys \(qformer_perceiver\.extra\.weight\)"):
        pm.load_photomaker_checkpoint(path)

    # A stale position_ids buffer (older transformers saved it) is tolerated.
    stale = {**raw["id_encoder"], "vision_model.embeddings.position_ids": torch.arange(257)[None]}
    path = _write(tmp_path / "stale.bin", {"id_encoder": stale, "lora_weights": raw["lora_weights"]}, checkpoint)
    pm.load_photomaker_checkpoint(path)


def test_bad_files_raise_model_error(checkpoint, tmp_path):
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    with pytest.raises(ModelError, match="not found"):
        pm.load_photomaker_checkpoint(tmp_path / "nope.bin")
    for name, payload in {
        "extra_top": {**raw, "config": {}},
        "one_key": {"id_encoder": raw["id_encoder"]},
        "renamed": {"image_encoder": raw["id_encoder"], "lora_weights": raw["lora_weights"]},
    }.items():
        path = _write(tmp_path / f"{name}.bin", payload, checkpoint)
        with pytest.raises(ModelError, match="top-level keys exactly"):
            pm.load_photomaker_checkpoint(path)
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a loadable torch checkpoint"):
        pm.load_photomaker_checkpoint(tmp_path / "junk.bin")
    # Without its sidecar a tiny file is read as published-size and the mismatch is explained.
    bare = _write(tmp_path / "bare.bin", raw)
    with pytest.raises(ModelError, match="sidecar"):
        pm.load_photomaker_checkpoint(bare)
    # ...but an explicit config needs no sidecar (as the published file needs none).
    _, _, config = pm.load_photomaker_checkpoint(bare, config=pm.tiny_photomaker_config(ID_DIM, CROSS_DIM))
    assert config.cross_attention_dim == CROSS_DIM


def test_load_identity_encoder_from_registry_entry(checkpoint):
    entry = ModelEntry(id="photomaker", path=checkpoint, family=None, kind=Kind.IDENTITY_ENCODER)
    encoder = pm.load_identity_encoder(entry, torch.device("cpu"), torch.float32)
    assert encoder.model_id == "photomaker"
    assert encoder.id_embeddings_dim == ID_DIM
    assert encoder.config == pm.tiny_photomaker_config(ID_DIM, CROSS_DIM)


# --- (b) identity fusion ----------------------------------------------------------------------


def test_encode_changes_only_the_class_tokens_and_identity_matters(encoder):
    torch.manual_seed(0)
    prompt = torch.randn(1, 77, CROSS_DIM)
    before = prompt.clone()
    images = _images(k=2)
    positions = [4, 5, 6, 7]
    ids_a, ids_b = torch.randn(2, ID_DIM), torch.randn(2, ID_DIM)
    fused_a = encoder.encode(images, ids_a, prompt, positions)
    fused_b = encoder.encode(images, ids_b, prompt, positions)
    assert torch.equal(prompt, before)  # not modified in place
    assert fused_a.shape == prompt.shape and fused_a.dtype == prompt.dtype
    changed = (fused_a != prompt).any(dim=-1)[0]
    assert changed.nonzero().flatten().tolist() == positions
    others = [i for i in range(77) if i not in positions]
    assert torch.equal(fused_a[0, others], prompt[0, others])
    assert torch.equal(fused_a[0, others], fused_b[0, others])
    relative = (fused_a - fused_b)[0, positions].norm(dim=-1) / fused_a[0, positions].norm(dim=-1)
    assert (relative > 0.3).all(), relative  # a different person: clearly different rows
    # Deterministic; positions are applied in ascending order whatever order they come in.
    assert torch.equal(encoder.encode(images, ids_a, prompt, positions), fused_a)
    assert torch.equal(encoder.encode(images, ids_a, prompt, [7, 5, 4, 6]), fused_a)


def test_encode_matches_the_published_fusion_order(encoder):
    torch.manual_seed(1)
    prompt = torch.randn(1, 20, CROSS_DIM)
    images = _images(seed=3, k=3)
    ids = torch.randn(3, ID_DIM)
    positions = [2, 3, 4, 5, 6, 7]
    fused = encoder.encode(images, ids, prompt, positions)
    net = encoder.encoder
    with torch.no_grad():
        tokens = net.id_tokens(pm.clip_preprocess(images), ids)  # [3, 2, d]
        assert tokens.shape == (3, 2, CROSS_DIM)
        flat = tokens.reshape(6, CROSS_DIM)  # image 0 token 0, image 0 token 1, image 1 token 0, ...
        for i, p in enumerate(positions):
            expected = net.fuse_module.fuse_fn(prompt[0, p][None], flat[i][None])[0]
            torch.testing.assert_close(fused[0, p], expected, rtol=1e-5, atol=1e-5)


def test_perceiver_attention_is_scaled_dot_product_attention_over_context_and_latents():
    torch.manual_seed(2)
    attn = pm.PerceiverAttention(dim=12, dim_head=4, heads=3)
    x, latents = torch.randn(2, 9, 12), torch.randn(2, 2, 12)
    with torch.no_grad():
        got = attn(x, latents)
        xn, ln = attn.norm1(x), attn.norm2(latents)
        q = attn.to_q(ln).view(2, 2, 3, 4).transpose(1, 2)
        k, v = attn.to_kv(torch.cat([xn, ln], dim=1)).chunk(2, dim=-1)
        k, v = (t.view(2, 11, 3, 4).transpose(1, 2) for t in (k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # 1/sqrt(dim_head)
        ref = attn.to_out(ref.transpose(1, 2).reshape(2, 2, 12))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert math.isclose(pm.dim_head_scale(4) ** 2, 1 / math.sqrt(4))


def test_encode_validation_names_the_field(encoder):
    prompt = torch.randn(1, 77, CROSS_DIM)
    images = _images(k=1)
    ids = torch.randn(1, ID_DIM)

    def field_of(**overrides) -> str:
        args = dict(reference_images=images, id_embeddings=ids, prompt_embeds=prompt, class_token_positions=[3, 4])
        args.update(overrides)
        with pytest.raises(InvalidArgument) as info:
            encoder.encode(**args)
        return info.value.field

    assert field_of(class_token_positions=[3]) == "class_token_positions"       # 1 image needs 2
    assert field_of(class_token_positions=[3, 4, 5]) == "class_token_positions"
    assert field_of(class_token_positions=[3, 3]) == "class_token_positions"    # not distinct
    assert field_of(class_token_positions=[3, 77]) == "class_token_positions"   # out of range
    assert field_of(class_token_positions=[-1, 4]) == "class_token_positions"
    assert field_of(id_embeddings=torch.randn(1, 512)) == "id_embeddings.shape"
    assert field_of(id_embeddings=torch.randn(2, ID_DIM)) == "id_embeddings.shape"  # one row per image
    assert field_of(id_embeddings=torch.full((1, ID_DIM), float("nan"))) == "id_embeddings"
    assert field_of(prompt_embeds=torch.randn(1, 77, 64)) == "prompt_embeds.shape"
    assert field_of(prompt_embeds=torch.randn(2, 77, CROSS_DIM)) == "prompt_embeds.shape"
    assert field_of(reference_images=[]) == "reference_images"
    assert field_of(reference_images=[np.zeros((8, 8), np.uint8)]) == "reference_images"
    assert field_of(reference_images=[np.zeros((8, 8, 3), np.float32)]) == "reference_images"
    with pytest.raises(InvalidArgument, match="expected 2 positions"):
        encoder.encode(images, ids, prompt, [3])


# --- (c) CLIP preprocessing -------------------------------------------------------------------

_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def _reference_preprocess(image: np.ndarray) -> np.ndarray:
    """CLIPImageProcessor's documented defaults, written out with PIL."""
    from PIL import Image

    h, w = image.shape[:2]
    if w <= h:
        size = (224, int(224 * h / w))
    else:
        size = (int(224 * w / h), 224)
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))
    top, left = (resized.shape[0] - 224) // 2, (resized.shape[1] - 224) // 2
    crop = resized[top:top + 224, left:left + 224].astype(np.float64) / 255.0
    return ((crop - _MEAN) / _STD).transpose(2, 0, 1)


def test_clip_preprocess_resizes_the_short_side_and_centre_crops():
    # 200 x 400: the short side becomes 224, the long 448, and the centre 224 columns are kept; the
    # red bands (columns < 80 and >= 320, i.e. < 90 and >= 358 after resizing) are cropped away.
    image = np.zeros((200, 400, 3), np.uint8)
    image[:, :, 1] = 255
    image[:, :80] = image[:, 320:] = (255, 0, 0)
    out = pm.clip_preprocess([image])
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    green = torch.tensor((np.array([0.0, 1.0, 0.0]) - _MEAN) / _STD, dtype=torch.float32)
    torch.testing.assert_close(out[0], green[:, None, None].expand(3, 224, 224), rtol=0, atol=1e-5)

    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (150, 262, 3), dtype=np.uint8), rng.integers(0, 256, (300, 226, 3), dtype=np.uint8)]
    out = pm.clip_preprocess(images)
    assert out.shape == (2, 3, 224, 224)
    for got, image in zip(out, images):
        np.testing.assert_allclose(got.numpy(), _reference_preprocess(image), rtol=0, atol=1e-4)
    # A 3-pixel-high image is still read as channels-last.
    assert pm.clip_preprocess([rng.integers(0, 256, (3, 10, 3), dtype=np.uint8)]).shape == (1, 3, 224, 224)


# --- (d) UNet LoRA ----------------------------------------------------------------------------

_LEGACY_KEY = re.compile(
    r"^unet\.(down_blocks|mid_block|up_blocks)\.[\w.]*attentions\.\d+\.transformer_blocks\.\d+\.attn[12]"
    r"\.processor\.to_(q|k|v|out)_lora\.(down|up)\.weight$")


def _unet_out(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 77, CROSS_DIM, generator=generator)
    cond = {"text_embeds": torch.randn(1, 32, generator=generator),
            "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])}
    with torch.no_grad():
        return unet(sample, 500, text, added_cond_kwargs=cond).sample


def _fresh_unet():
    from diffmesh.models.tiny import _unet

    return _unet(sample_size=16, cross_attention_dim=CROSS_DIM, sdxl=True).eval()


def test_tiny_lora_uses_the_legacy_key_format(tiny_unet):
    lora = pm.tiny_photomaker_lora(tiny_unet, rank=4, seed=1)
    assert lora and all(_LEGACY_KEY.match(k) for k in lora), [k for k in lora if not _LEGACY_KEY.match(k)][:3]
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight" in lora
    up = lora["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight"]
    down = lora["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight"]
    assert down.shape == (4, CROSS_DIM) and up.shape[1] == 4 and up.abs().sum() > 0
    again = pm.tiny_photomaker_lora(tiny_unet, rank=4, seed=1)
    assert all(torch.equal(v, again[k]) for k, v in lora.items())
    other = pm.tiny_photomaker_lora(tiny_unet, rank=4, seed=2)
    assert not torch.equal(up, other["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor."
                                     "to_k_lora.up.weight"])


def test_lora_loads_changes_the_unet_and_disables_exactly(checkpoint):
    unet = _fresh_unet()
    base = _unet_out(unet)
    lora = pm.load_photomaker_lora_weights(checkpoint)
    assert pm.load_photomaker_lora(unet, lora) == "photomaker"
    assert "photomaker" in unet.peft_config
    layer = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert torch.equal(layer.lora_A["photomaker"].weight, lora[
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight"])
    enabled = _unet_out(unet)
    assert (enabled - base).abs().max() > 1e-2
    unet.disable_adapters()
    assert torch.equal(_unet_out(unet), base)
    unet.enable_adapters()
    assert torch.equal(_unet_out(unet), enabled)
    unet.set_adapters(["photomaker"], [0.0])
    assert torch.equal(_unet_out(unet), base)
    with pytest.raises(ModelError, match="already has an adapter"):
        pm.load_photomaker_lora(unet, lora)


def test_lora_accepts_unprefixed_keys_and_rejects_foreign_ones(tiny_unet):
    lora = pm.tiny_photomaker_lora(tiny_unet, rank=2, seed=3)
    unet = _fresh_unet()
    pm.load_photomaker_lora(unet, {k.removeprefix("unet."): v for k, v in lora.items()}, adapter_name="pm2")
    assert "pm2" in unet.peft_config

    unet = _fresh_unet()
    stray = dict(lora)
    stray["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn9.processor.to_q_lora.down.weight"] = \
        torch.zeros(2, 64)
    stray["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn9.processor.to_q_lora.up.weight"] = \
        torch.zeros(64, 2)
    with pytest.raises(ModelError, match="attn9"):
        pm.load_photomaker_lora(unet, stray)
    assert "photomaker" not in getattr(unet, "peft_config", {})  # nothing half-loaded stays
    with pytest.raises(ModelError, match="not UNet LoRA"):
        pm.load_photomaker_lora(_fresh_unet(), {**lora, "text_encoder.x.lora_A.weight": torch.zeros(2, 2)})
    with pytest.raises(ModelError, match="empty"):
        pm.load_photomaker_lora(_fresh_unet(), {})
