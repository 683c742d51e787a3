"""PhotoMaker V2 identity encoder, its checkpoint format and its UNet LoRA (plain torch + transformers).

PhotoMaker V2 (TencentARC) turns k reference photos of one person into 2 identity tokens each and
fuses them into the prompt embeddings at the k * 2 repeated class-word positions ("a man img ..."
becomes "a man man ..." with the class tokens marked). Per reference image:

1. the CLIP ViT-L/14 vision tower's LAST HIDDEN STATE ([257, 1024] at 224 px; pre-``post_layernorm``,
   so neither ``visual_projection`` nor ``visual_projection_2`` is used, though both are in the file);
2. ``qformer_perceiver``: the RAW insightface embedding -> ``token_proj`` (Linear, GELU, Linear) ->
   [2, cross_dim] -> ``token_norm``, then a 4-layer perceiver resampler attends from those 2 tokens
   to the projected patch tokens; its output is added back (residual);
3. ``fuse_module``: for each marked class token, ``mlp1(cat(class_embed, id_token)) + class_embed``,
   then ``mlp2`` (residual) and ``layer_norm``; the results are written back in position order
   (``masked_scatter``), token j of image i going to the (i * 2 + j)-th marked position.

Module and parameter names follow the published code, so ``photomaker-v2.bin``'s ``id_encoder``
state dict (463 tensors) loads with strict key matching. The file's ``lora_weights`` are legacy
diffusers UNet LoRA keys (``unet.<module>.processor.to_q_lora.down.weight``); diffusers 0.42 still
converts them (``convert_unet_state_dict_to_peft``) and ``load_photomaker_lora`` loads them as a
switchable peft adapter named "photomaker".

A published checkpoint holds exactly the two top-level keys and needs no config (the published
sizes are the default). Tiny checkpoints (tests, dev) carry their sizes in a sidecar
``<file>.json`` next to the ``.bin``, which published files never need.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from diffmesh.errors import InvalidArgument
from diffmesh.models.registry import ModelEntry, ModelError

CHECKPOINT_KEYS: tuple[str, str] = ("id_encoder", "lora_weights")
ADAPTER_NAME = "photomaker"
SIDECAR_SUFFIX = ".json"
_SIDECAR_FORMAT = "diffmesh-photomaker-config/1"
# A stale buffer some older transformers versions saved; not a weight, so it is dropped on load.
_POSITION_IDS_KEY = "vision_model.embeddings.position_ids"
_MAX_NAMED = 5  # keys named in an error message


# ----------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class PhotoMakerConfig:
    """Sizes of a PhotoMaker V2 ID encoder. The defaults are the published ones (``published()``)."""

    # CLIP vision tower (ViT-L/14 at full size)
    vision_hidden_size: int = 1024
    vision_intermediate_size: int = 4096
    vision_num_layers: int = 24
    vision_num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 768        # visual_projection (in the file, unused by V2's forward)
    projection_2_dim: int = 1280     # visual_projection_2 (in the file, unused by V2's forward)
    # identity
    id_embeddings_dim: int = 512     # insightface ArcFace; 128 for dlib
    cross_attention_dim: int = 2048  # SDXL's text embedding width (768 + 1280)
    num_tokens: int = 2              # identity tokens per reference image
    token_proj_mult: int = 4         # token_proj hidden = id_embeddings_dim * this
    # perceiver resampler
    perceiver_depth: int = 4
    perceiver_dim_head: int = 128
    perceiver_heads: int = 16
    perceiver_ff_mult: int = 4

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelError(f"PhotoMakerConfig.{f.name} must be a positive integer, got {value!r}")
        if self.vision_hidden_size % self.vision_num_heads:
            raise ModelError(f"PhotoMakerConfig: vision_hidden_size {self.vision_hidden_size} is not a multiple "
                             f"of vision_num_heads {self.vision_num_heads}")
        if self.image_size % self.patch_size:
            raise ModelError(f"PhotoMakerConfig: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")

    @classmethod
    def published(cls) -> "PhotoMakerConfig":
        """The sizes of TencentARC's photomaker-v2.bin (ViT-L/14, ArcFace 512, SDXL 2048)."""
        return cls()

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def vision_config(self) -> Any:
        from transformers import CLIPVisionConfig

        # hidden_act (quick_gelu) and layer_norm_eps (1e-5) are CLIPVisionConfig's defaults, as in
        # the published code, which sets only the sizes below.
        return CLIPVisionConfig(
            hidden_size=self.vision_hidden_size,
            intermediate_size=self.vision_intermediate_size,
            num_attention_heads=self.vision_num_heads,
            num_hidden_layers=self.vision_num_layers,
            image_size=self.image_size,
            patch_size=self.patch_size,
            projection_dim=self.projection_dim,
        )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "PhotoMakerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"{source}: unknown PhotoMakerConfig keys {unknown} (known: {sorted(known)})")
        return cls(**dict(data))


def tiny_photomaker_config(id_embeddings_dim: int, cross_attention_dim: int) -> PhotoMakerConfig:
    """The tiny config of ``build_tiny_photomaker``: the published structure (224 px, patch 14, so 257
    vision tokens; perceiver depth 4; 2 tokens per image) at widths of a few dozen."""
    return PhotoMakerConfig(
        vision_hidden_size=32,
        vision_intermediate_size=64,
        vision_num_layers=2,
        vision_num_heads=2,
        image_size=224,
        patch_size=14,
        projection_dim=16,
        projection_2_dim=24,
        id_embeddings_dim=id_embeddings_dim,
        cross_attention_dim=cross_attention_dim,
        num_tokens=2,
        token_proj_mult=4,
        perceiver_depth=4,
        perceiver_dim_head=8,
        perceiver_heads=2,
        perceiver_ff_mult=4,
    )


# ----------------------------------------------------------------------------------------------
# Modules (names match the published state dict)


class MLP(nn.Module):
    """LayerNorm -> fc1 -> GELU -> fc2, optionally added to its input."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, use_residual: bool = True) -> None:
        super().__init__()
        if use_residual and in_dim != out_dim:
            raise ValueError(f"a residual MLP needs in_dim == out_dim, got {in_dim} -> {out_dim}")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.act_fn = nn.GELU()
        self.use_residual = use_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return out + x if self.use_residual else out


class PerceiverAttention(nn.Module):
    """Latents attend to [context; latents] (IP-Adapter / PhotoMaker resampler attention)."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        inner = dim_head * heads
        self.dim_head = dim_head
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)  # context
        self.norm2 = nn.LayerNorm(dim)  # latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)  # [b, heads, n, dim_head]

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, n_latents, _ = latents.shape
        q = self._heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)
        # Scale q and k by dim_head^-1/4 each (steadier in fp16 than scaling the product); softmax in fp32.
        scale = dim_head_scale(self.dim_head)
        weights = (q * scale) @ (k * scale).transpose(-2, -1)
        weights = torch.softmax(weights.float(), dim=-1).to(weights.dtype)
        out = (weights @ v).transpose(1, 2).reshape(b, n_latents, -1)
        return self.to_out(out)


def dim_head_scale(dim_head: int) -> float:
    return 1.0 / math.sqrt(math.sqrt(dim_head))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """Keys .0 (LayerNorm), .1 (Linear, no bias), .3 (Linear, no bias); .2 is the GELU."""
    inner = dim * mult
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


class FacePerceiverResampler(nn.Module):
    def __init__(self, *, dim: int, depth: int, dim_head: int, heads: int, embedding_dim: int,
                 output_dim: int, ff_mult: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for attn, ff in self.layers:  # type: ignore[misc]
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class QFormerPerceiver(nn.Module):
    """Raw face embedding -> num_tokens tokens, refined by attending to the CLIP patch tokens."""

    def __init__(self, config: PhotoMakerConfig) -> None:
        super().__init__()
        c = config
        self.num_tokens = c.num_tokens
        self.cross_attention_dim = c.cross_attention_dim
        hidden = c.id_embeddings_dim * c.token_proj_mult
        self.token_proj = nn.Sequential(
            nn.Linear(c.id_embeddings_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, c.cross_attention_dim * c.num_tokens),
        )
        self.token_norm = nn.LayerNorm(c.cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(
            dim=c.cross_attention_dim,
            depth=c.perceiver_depth,
            dim_head=c.perceiver_dim_head,
            heads=c.perceiver_heads,
            embedding_dim=c.vision_hidden_size,
            output_dim=c.cross_attention_dim,
            ff_mult=c.perceiver_ff_mult,
        )

    def forward(self, id_embeds: torch.Tensor, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """[k, id_dim], [k, patches + 1, hidden] -> [k, num_tokens, cross_dim]."""
        tokens = self.token_proj(id_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        tokens = self.token_norm(tokens)
        return tokens + self.perceiver_resampler(tokens, last_hidden_state)


class FuseModule(nn.Module):
    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.mlp1 = MLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def fuse_fn(self, prompt_embeds: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
        fused = self.mlp1(torch.cat([prompt_embeds, id_embeds], dim=-1)) + prompt_embeds
        return self.layer_norm(self.mlp2(fused))

    def forward(self, prompt_embeds: torch.Tensor, id_tokens: torch.Tensor,
                class_tokens_mask: torch.Tensor) -> torch.Tensor:
        """prompt_embeds [1, seq, d], id_tokens [k, num_tokens, d], class_tokens_mask [1, seq] bool
        with k * num_tokens True -> a new [1, seq, d]; the input is not modified."""
        flat_mask = class_tokens_mask.reshape(-1)
        rows = prompt_embeds.reshape(-1, prompt_embeds.shape[-1])
        id_rows = id_tokens.reshape(-1, id_tokens.shape[-1]).to(prompt_embeds.dtype)
        n = int(flat_mask.sum())
        if n != id_rows.shape[0]:
            raise ValueError(f"{n} class tokens marked for {id_rows.shape[0]} identity tokens")
        fused = self.fuse_fn(rows[flat_mask], id_rows)
        out = rows.masked_scatter(flat_mask[:, None], fused.to(rows.dtype))
        return out.view(prompt_embeds.shape)


class PhotoMakerV2IdEncoder(nn.Module):
    """PhotoMaker V2's ID encoder; its state dict is the published checkpoint's ``id_encoder``."""

    def __init__(self, config: PhotoMakerConfig | None = None) -> None:
        super().__init__()
        from transformers import CLIPVisionModel

        self.config = config = config or PhotoMakerConfig.published()
        # transformers' CLIPVisionModel: keys embeddings.*, pre_layrnorm.*, encoder.layers.N.*,
        # post_layernorm.*, so vision_model.* here, as in CLIPVisionModelWithProjection.
        self.vision_model = CLIPVisionModel._from_config(config.vision_config())
        self.visual_projection = nn.Linear(config.vision_hidden_size, config.projection_dim, bias=False)
        self.visual_projection_2 = nn.Linear(config.vision_hidden_size, config.projection_2_dim, bias=False)
        self.fuse_module = FuseModule(config.cross_attention_dim)
        self.qformer_perceiver = QFormerPerceiver(config)

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def cross_attention_dim(self) -> int:
        return self.config.cross_attention_dim

    def id_tokens(self, id_pixel_values: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
        """[k, 3, H, W] CLIP-preprocessed references, [k, id_dim] raw face embeddings ->
        [k, num_tokens, cross_dim]."""
        last_hidden_state = self.vision_model(pixel_values=id_pixel_values).last_hidden_state
        return self.qformer_perceiver(id_embeds.reshape(id_pixel_values.shape[0], -1), last_hidden_state)

    def forward(self, id_pixel_values: torch.Tensor, prompt_embeds: torch.Tensor,
                class_tokens_mask: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
        """id_pixel_values [k, 3, H, W] (or [1, k, 3, H, W], as published), prompt_embeds
        [1, seq, d], class_tokens_mask [1, seq] bool, id_embeds [k, id_dim] (or [1, k, id_dim])."""
        if id_pixel_values.dim() == 5:
            id_pixel_values = id_pixel_values.flatten(0, 1)
        tokens = self.id_tokens(id_pixel_values, id_embeds.reshape(id_pixel_values.shape[0], -1))
        return self.fuse_module(prompt_embeds, tokens, class_tokens_mask)


# ----------------------------------------------------------------------------------------------
# Checkpoint I/O


def sidecar_path(path: Path | str) -> Path:
    """``<file>.json``: where a non-published checkpoint keeps its PhotoMakerConfig."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_photomaker_checkpoint(path: Path | str, encoder: PhotoMakerV2IdEncoder,
                               lora_weights: Mapping[str, torch.Tensor],
                               config: PhotoMakerConfig | None = None) -> Path:
    """Write ``{"id_encoder": ..., "lora_weights": ...}`` (the published layout, in that order) as a
    torch .bin. A config other than the published one goes to the sidecar ``<file>.json``; saving a
    published-size checkpoint removes a stale sidecar so the file loads as published."""
    path = Path(path)
    config = config or encoder.config
    if config != encoder.config:
        raise ModelError(f"{path}: the config given does not match the encoder's own config")
    id_encoder = {k: v.detach().to("cpu").contiguous().clone() for k, v in encoder.state_dict().items()}
    lora = {str(k): v.detach().to("cpu").contiguous().clone() for k, v in lora_weights.items()}
    payload = {CHECKPOINT_KEYS[0]: id_encoder, CHECKPOINT_KEYS[1]: lora}
    _atomic_write(path, lambda tmp: torch.save(payload, tmp))
    sidecar = sidecar_path(path)
    if config == PhotoMakerConfig.published():
        if sidecar.exists():
            sidecar.unlink()
    else:
        text = json.dumps({"format": _SIDECAR_FORMAT, "config": config.to_dict()}, indent=2, sort_keys=True)

        def write_json(tmp: str) -> None:
            Path(tmp).write_text(text + "\n")

        _atomic_write(sidecar, write_json)
    return path


def read_photomaker_config(path: Path | str) -> PhotoMakerConfig:
    """The sidecar's config if ``<file>.json`` exists, else the published config."""
    sidecar = sidecar_path(path)
    if not sidecar.exists():
        return PhotoMakerConfig.published()
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{sidecar}: unreadable PhotoMaker config sidecar: {e}") from e
    if not isinstance(data, dict) or data.get("format") != _SIDECAR_FORMAT or not isinstance(data.get("config"), dict):
        raise ModelError(f"{sidecar}: not a PhotoMaker config sidecar (expected format {_SIDECAR_FORMAT!r} "
                         "and a 'config' object)")
    try:
        return PhotoMakerConfig.from_dict(data["config"], source=str(sidecar))
    except TypeError as e:
        raise ModelError(f"{sidecar}: bad PhotoMaker config: {e}") from e


def _named(keys: Sequence[str]) -> str:
    shown = ", ".join(sorted(keys)[:_MAX_NAMED])
    more = len(keys) - _MAX_NAMED
    return shown + (f" and {more} more" if more > 0 else "")


def _read_checkpoint(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise ModelError(f"PhotoMaker checkpoint {path} not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (not a zip / truncated), EOFError...
        raise ModelError(f"{path}: not a loadable torch checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a dict with keys {list(CHECKPOINT_KEYS)}, got {type(data).__name__}")
    keys = [str(k) for k in data.keys()]
    if set(keys) != set(CHECKPOINT_KEYS) or len(keys) != len(CHECKPOINT_KEYS):
        raise ModelError(f"{path}: a PhotoMaker checkpoint has top-level keys exactly {list(CHECKPOINT_KEYS)}, "
                         f"this one has {keys[:10]}")
    for key in CHECKPOINT_KEYS:
        part = data[key]
        if not isinstance(part, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in part.items()):
            raise ModelError(f"{path}: {key!r} must map parameter names to tensors")
    return data


def _build_on_meta(config: PhotoMakerConfig) -> PhotoMakerV2IdEncoder:
    with torch.device("meta"):
        return PhotoMakerV2IdEncoder(config)


def _restore_buffers(encoder: PhotoMakerV2IdEncoder) -> None:
    # Non-persistent buffers are not in a state dict: rebuild the vision embeddings' position ids.
    embeddings = encoder.vision_model.embeddings
    embeddings.register_buffer(
        "position_ids", torch.arange(embeddings.num_positions).expand((1, -1)), persistent=False)
    leftover = [n for n, t in list(encoder.named_parameters()) + list(encoder.named_buffers()) if t.is_meta]
    if leftover:  # a transformers change added a buffer this loader does not know how to rebuild
        raise ModelError(f"PhotoMaker encoder: tensors not restored after loading: {_named(leftover)}")


def load_id_encoder_state(state: Mapping[str, torch.Tensor], config: PhotoMakerConfig, device: Any = "cpu",
                          dtype: torch.dtype = torch.float32, source: str = "id_encoder",
                          hint: str = "") -> PhotoMakerV2IdEncoder:
    """Build an encoder of ``config`` from a state dict, strictly (every key, every shape); ``hint``
    ends mismatch messages (where the config came from)."""
    suffix = f" ({hint})" if hint else ""
    state = dict(state)
    state.pop(_POSITION_IDS_KEY, None)
    encoder = _build_on_meta(config)
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({_named(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({_named(unexpected)})")
        raise ModelError(f"{source}: does not match a PhotoMaker V2 id_encoder: {'; '.join(parts)}{suffix}")
    wrong = [f"{k} {list(state[k].shape)} (expected {list(v.shape)})"
             for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ModelError(f"{source}: {len(wrong)} tensors have other sizes than {config}: {', '.join(wrong[:3])}"
                         f"{' ...' if len(wrong) > 3 else ''}{suffix}")
    try:
        encoder.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelError(f"{source}: {e}") from e
    _restore_buffers(encoder)
    encoder = encoder.to(device=device, dtype=dtype)
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder


def load_photomaker_checkpoint(path: Path | str, device: Any = "cpu", dtype: torch.dtype = torch.float32,
                               config: PhotoMakerConfig | None = None,
                               ) -> tuple[PhotoMakerV2IdEncoder, dict[str, torch.Tensor], PhotoMakerConfig]:
    """Load a PhotoMaker V2 .bin -> (encoder in eval mode on device/dtype, lora_weights on CPU, config).

    The config is ``config`` if given, else the sidecar ``<file>.json`` if present, else the
    published one, so a published photomaker-v2.bin loads as it is."""
    path = Path(path)
    data = _read_checkpoint(path)
    if config is not None:
        hint = "with the config given"
    elif sidecar_path(path).exists():
        hint = f"with the config of {sidecar_path(path).name}"
    else:
        hint = (f"read as the published sizes: no {sidecar_path(path).name} sidecar next to it, which a "
                "non-published checkpoint needs")
    config = config or read_photomaker_config(path)
    encoder = load_id_encoder_state(data["id_encoder"], config, device, dtype, source=f"{path}: id_encoder",
                                    hint=hint)
    return encoder, dict(data["lora_weights"]), config


def load_photomaker_lora_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """Only the checkpoint's ``lora_weights`` (for the denoiser, which does not need the encoder)."""
    return dict(_read_checkpoint(Path(path))["lora_weights"])


# ----------------------------------------------------------------------------------------------
# CLIP preprocessing


@lru_cache(maxsize=1)
def _image_processor() -> Any:
    # The PIL/numpy processor: what PhotoMaker's CLIPImageProcessor() was when it was published, and
    # it needs no torchvision. Its defaults: shortest edge 224 (bicubic), centre crop 224, x 1/255,
    # CLIP mean/std.
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # older transformers: CLIPImageProcessor is the slow PIL one
        from transformers import CLIPImageProcessor as Processor
    return Processor()


def clip_preprocess(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] RGB images -> float32 [k, 3, 224, 224] (CLIPImageProcessor's defaults)."""
    _check_images(images)
    processor = _image_processor()
    out = processor([np.ascontiguousarray(image) for image in images], return_tensors="pt",
                    input_data_format="channels_last")
    return torch.as_tensor(out["pixel_values"], dtype=torch.float32)


def _check_images(images: Any) -> None:
    if not isinstance(images, (list, tuple)) or not images:
        raise InvalidArgument("reference_images", type(images).__name__ if not isinstance(images, (list, tuple))
                              else len(images), "needs at least one uint8 [H, W, 3] RGB image")
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            raise InvalidArgument("reference_images", f"[{i}]: {getattr(image, 'dtype', type(image).__name__)}",
                                  f"image {i} must be a uint8 numpy array")
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise InvalidArgument("reference_images", f"[{i}]: {list(image.shape)}",
                                  f"image {i} must be [H, W, 3] RGB")


# ----------------------------------------------------------------------------------------------
# The face stage's identity encoder


class IdentityEncoder:
    """A loaded PhotoMaker V2 ID encoder with request validation (what the face stage serves)."""

    def __init__(self, encoder: PhotoMakerV2IdEncoder, config: PhotoMakerConfig | None = None,
                 model_id: str = "") -> None:
        self.encoder = encoder.eval()
        self.config = config or encoder.config
        self.model_id = model_id

    @classmethod
    def load(cls, path: Path | str, device: Any = "cpu", dtype: torch.dtype = torch.float32,
             model_id: str = "", config: PhotoMakerConfig | None = None) -> "IdentityEncoder":
        encoder, _lora, config = load_photomaker_checkpoint(path, device, dtype, config)
        return cls(encoder, config, model_id or Path(path).name)

    @property
    def id_embeddings_dim(self) -> int:
        return self.config.id_embeddings_dim

    @property
    def cross_attention_dim(self) -> int:
        return self.config.cross_attention_dim

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def encode(self, reference_images: Sequence[np.ndarray], id_embeddings: torch.Tensor | np.ndarray,
               prompt_embeds: torch.Tensor, class_token_positions: Sequence[int]) -> torch.Tensor:
        """Fuse k references' identity into prompt_embeds [1, seq, cross_dim] at the k * num_tokens
        class-token positions (any order: they are applied ascending, as PhotoMaker's mask is).
        id_embeddings [k, id_dim] are the RAW face-analysis embeddings (not L2-normalised), one row
        per reference image in the same order. Returns a new tensor of prompt_embeds' dtype/device."""
        _check_images(reference_images)
        k = len(reference_images)
        ids = torch.as_tensor(id_embeddings)
        if ids.dim() != 2 or ids.shape[0] != k or ids.shape[1] != self.id_embeddings_dim:
            raise InvalidArgument("id_embeddings.shape", list(ids.shape),
                                  f"expected [{k}, {self.id_embeddings_dim}] (one {self.id_embeddings_dim}-d "
                                  "row per reference image)")
        if not ids.is_floating_point() or not bool(torch.isfinite(ids).all()):
            raise InvalidArgument("id_embeddings", f"{ids.dtype}", "must be finite floating-point values")
        if not isinstance(prompt_embeds, torch.Tensor):
            raise InvalidArgument("prompt_embeds", type(prompt_embeds).__name__, "must be a tensor")
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != 1 or prompt_embeds.shape[2] != self.cross_attention_dim \
                or prompt_embeds.shape[1] == 0:
            raise InvalidArgument("prompt_embeds.shape", list(prompt_embeds.shape),
                                  f"expected [1, seq, {self.cross_attention_dim}]")
        if not prompt_embeds.is_floating_point() or not bool(torch.isfinite(prompt_embeds).all()):
            raise InvalidArgument("prompt_embeds", f"{prompt_embeds.dtype}", "must be finite floating-point values")
        seq = prompt_embeds.shape[1]
        positions = list(class_token_positions)
        wanted = k * self.num_tokens
        if len(positions) != wanted:
            raise InvalidArgument("class_token_positions", positions,
                                  f"expected {wanted} positions ({k} reference images x {self.num_tokens} tokens: "
                                  f"the class word repeated {wanted} times)")
        for p in positions:
            if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 0 <= int(p) < seq:
                raise InvalidArgument("class_token_positions", positions,
                                      f"each position must be an integer in [0, {seq})")
        if len(set(int(p) for p in positions)) != len(positions):
            raise InvalidArgument("class_token_positions", positions, "positions must be distinct")

        pixels = clip_preprocess(list(reference_images))
        device, dtype = self.device, self.dtype
        mask = torch.zeros(1, seq, dtype=torch.bool)
        mask[0, [int(p) for p in positions]] = True
        with torch.no_grad():
            fused = self.encoder(pixels.to(device, dtype), prompt_embeds.to(device, dtype), mask.to(device),
                                 ids.to(device, dtype))
        return fused.to(device=prompt_embeds.device, dtype=prompt_embeds.dtype)


def load_identity_encoder(entry: ModelEntry, device: Any, dtype: torch.dtype) -> IdentityEncoder:
    """The face stage's loader for an ``identity_encoder`` registry entry (a PhotoMaker V2 .bin)."""
    return IdentityEncoder.load(entry.path, device, dtype, model_id=entry.id)


# ----------------------------------------------------------------------------------------------
# LoRA


def _unet_attention_modules(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffusers.models.attention_processor import Attention

    return [(name, m) for name, m in unet.named_modules() if isinstance(m, Attention)]


def tiny_photomaker_lora(unet: nn.Module, rank: int = 4, seed: int = 0,
                         scale: float = 0.5) -> dict[str, torch.Tensor]:
    """A deterministic, non-zero LoRA for every attention layer (attn1 and attn2: to_q, to_k, to_v,
    to_out.0) of ``unet``, in the published file's legacy diffusers key format:
    ``unet.<attention module>.processor.<to_q|to_k|to_v|to_out>_lora.<down|up>.weight``.
    down [rank, in] ~ N(0, 1/in), up [out, rank] ~ scale * N(0, 1/rank): changes outputs visibly."""
    generator = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    modules = _unet_attention_modules(unet)
    if not modules:
        raise ModelError("tiny_photomaker_lora: the UNet has no attention layers")
    for name, attn in modules:
        for proj, linear in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v),
                             ("to_out", attn.to_out[0])):
            base = f"unet.{name}.processor.{proj}_lora"
            down = torch.randn(rank, linear.in_features, generator=generator) / math.sqrt(linear.in_features)
            up = torch.randn(linear.out_features, rank, generator=generator) * (scale / math.sqrt(rank))
            weights[f"{base}.down.weight"] = down
            weights[f"{base}.up.weight"] = up
    return weights


def load_photomaker_lora(unet: nn.Module, lora_weights: Mapping[str, torch.Tensor],
                         adapter_name: str = ADAPTER_NAME) -> str:
    """Load PhotoMaker's UNet LoRA into ``unet`` through diffusers' own LoRA loading, as the peft
    adapter ``adapter_name``; returns the adapter name. The adapter is switchable afterwards with
    ``unet.set_adapters([...], weights)``, ``unet.disable_adapters()`` / ``unet.enable_adapters()``
    and removable with ``unet.delete_adapters(adapter_name)``.

    Keys may be the published legacy format (``unet.<module>.processor.to_q_lora.down.weight``),
    the same without the ``unet.`` prefix, or any UNet format diffusers' SDXL loader accepts. Every
    tensor must land in the UNet (a ModelError names the ones that did not, and nothing stays loaded)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict

    if not lora_weights:
        raise ModelError("PhotoMaker lora_weights is empty")
    if adapter_name in getattr(unet, "peft_config", {}):
        raise ModelError(f"the UNet already has an adapter named {adapter_name!r}")
    state = {str(k): v for k, v in lora_weights.items()}
    if not any(k.startswith(("unet.", "text_encoder")) for k in state):
        state = {f"unet.{k}": v for k, v in state.items()}  # older un-prefixed attention-processor keys
    try:
        state, network_alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(
            state, unet_config=getattr(unet, "config", None), return_lora_metadata=True)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"PhotoMaker lora_weights: not a LoRA diffusers can read: {e}") from e
    foreign = [k for k in state if not k.startswith("unet.")]
    if foreign:
        raise ModelError(f"PhotoMaker lora_weights: {len(foreign)} keys are not UNet LoRA weights "
                         f"({_named(foreign)}); only a UNet LoRA is supported")
    not_lora = [k for k in state if "lora" not in k]
    if not_lora:
        raise ModelError(f"PhotoMaker lora_weights: keys without 'lora' ({_named(not_lora)})")
    unet_state = {k.removeprefix("unet."): v for k, v in state.items()}
    expected = set(unet_state if "lora_A" in next(iter(unet_state)) else convert_unet_state_dict_to_peft(unet_state))
    try:
        StableDiffusionXLPipeline.load_lora_into_unet(
            state, network_alphas=network_alphas, unet=unet, adapter_name=adapter_name, metadata=metadata)
    except (ValueError, KeyError, RuntimeError) as e:
        if adapter_name in getattr(unet, "peft_config", {}):
            unet.delete_adapters(adapter_name)
        raise ModelError(f"PhotoMaker lora_weights do not fit this UNet: {e}") from e
    loaded = set(get_peft_model_state_dict(unet, adapter_name=adapter_name))
    if loaded != expected:
        unet.delete_adapters(adapter_name)
        unused = sorted(expected - loaded)
        absent = sorted(loaded - expected)
        detail = []
        if unused:
            detail.append(f"{len(unused)} tensors match no UNet layer ({_named(unused)})")
        if absent:
            detail.append(f"{len(absent)} adapter tensors were not in the file ({_named(absent)})")
        raise ModelError(f"PhotoMaker lora_weights do not fit this UNet: {'; '.join(detail)}")
    return adapter_name


# ----------------------------------------------------------------------------------------------
# Tiny checkpoint


# Default Linear init makes mlp1's output small next to the class-token embedding it is added to,
# so identities would barely move the fused rows; this gain on fuse_module.mlp1.fc2 makes the
# identity token's share of the fused embedding comparable to the text's.
_TINY_FUSE_GAIN = 3.0


def _init_tiny(encoder: PhotoMakerV2IdEncoder, seed: int) -> None:
    """Deterministic weights from ``seed`` alone (the global RNG is not used)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator)

    with torch.no_grad():
        for module_name, module in encoder.named_modules():
            for leaf, param in module.named_parameters(recurse=False):
                name = f"{module_name}.{leaf}"
                if isinstance(module, nn.LayerNorm):
                    param.copy_(1.0 + 0.1 * randn(param) if leaf == "weight" else 0.02 * randn(param))
                elif leaf == "bias":
                    param.copy_(0.02 * randn(param))
                elif name.endswith("class_embedding"):
                    param.copy_(randn(param))
                elif name.endswith("position_embedding.weight"):
                    param.copy_(0.1 * randn(param))
                else:  # Linear [out, in] and the patch Conv2d [out, 3, p, p]: unit gain
                    param.copy_(randn(param) / math.sqrt(param[0].numel()))
        encoder.fuse_module.mlp1.fc2.weight.mul_(_TINY_FUSE_GAIN)


def build_tiny_photomaker(path: Path | str, unet: nn.Module, id_embeddings_dim: int,
                          cross_attention_dim: int, seed: int = 0) -> Path:
    """Write a tiny PhotoMaker V2 checkpoint (``tiny_photomaker_config`` sizes, deterministic
    weights from ``seed``, LoRA from ``tiny_photomaker_lora(unet)``) to ``path`` + its sidecar."""
    path = Path(path)
    config = tiny_photomaker_config(id_embeddings_dim, cross_attention_dim)
    with torch.random.fork_rng(devices=[]):  # module construction draws from the global RNG
        encoder = PhotoMakerV2IdEncoder(config)
    _init_tiny(encoder, seed)
    lora = tiny_photomaker_lora(unet, rank=4, seed=seed)
    return save_photomaker_checkpoint(path, encoder, lora, config)


__all__ = [
    "ADAPTER_NAME",
    "CHECKPOINT_KEYS",
    "FacePerceiverResampler",
    "FuseModule",
    "IdentityEncoder",
    "MLP",
    "PerceiverAttention",
    "PhotoMakerConfig",
    "PhotoMakerV2IdEncoder",
    "QFormerPerceiver",
    "build_tiny_photomaker",
    "clip_preprocess",
    "load_id_encoder_state",
    "load_identity_encoder",
    "load_photomaker_checkpoint",
    "load_photomaker_lora",
    "load_photomaker_lora_weights",
    "read_photomaker_config",
    "save_photomaker_checkpoint",
    "sidecar_path",
    "tiny_photomaker_config",
    "tiny_photomaker_lora",
]
