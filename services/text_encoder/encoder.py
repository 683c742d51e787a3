"""Prompt -> CLIP hidden states, exactly as diffusers' SD 1.x / SDXL pipelines encode prompts.
Plain torch + transformers; no gRPC."""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffmesh.models.registry import ModelEntry, ModelFamily


@dataclass(frozen=True)
class PromptEmbeddings:
    prompt_embeds: torch.Tensor                       # [1, 77, D]
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None  # SDXL [1, P]
    negative_pooled_prompt_embeds: torch.Tensor | None = None


class ClipPromptEncoder:
    def __init__(self, entry: ModelEntry, device: torch.device, dtype: torch.dtype) -> None:
        self.entry = entry
        self.device = device
        self.is_sdxl = entry.family == ModelFamily.SDXL
        load = dict(local_files_only=True, torch_dtype=dtype)
        self.tokenizers = [CLIPTokenizer.from_pretrained(entry.component_dir("tokenizer"))]
        self.encoders: list[torch.nn.Module] = []
        if self.is_sdxl:
            self.tokenizers.append(CLIPTokenizer.from_pretrained(entry.component_dir("tokenizer_2")))
            self.encoders.append(CLIPTextModel.from_pretrained(entry.component_dir("text_encoder"), **load))
            self.encoders.append(CLIPTextModelWithProjection.from_pretrained(
                entry.component_dir("text_encoder_2"), **load))
        else:
            self.encoders.append(CLIPTextModel.from_pretrained(entry.component_dir("text_encoder"), **load))
        for encoder in self.encoders:
            encoder.to(device).eval()
        index = json.loads((entry.path / "model_index.json").read_text())
        # SDXL's pipelines use zero negative conditioning when no negative prompt is given.
        self.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", False))

    def _ids(self, tokenizer: CLIPTokenizer, text: str) -> torch.Tensor:
        return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(self.device)

    def _encode_sd15(self, text: str) -> torch.Tensor:
        encoder = self.encoders[0]
        ids = self._ids(self.tokenizers[0], text)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizers[0].pad_token_id).long()
        return encoder(ids, attention_mask=mask)[0]

    def _encode_sdxl(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            out = encoder(self._ids(tokenizer, text), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]  # text_embeds of the projection encoder
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    @torch.inference_mode()
    def encode(self, prompt: str, negative_prompt: str | None, with_negative: bool) -> PromptEmbeddings:
        if not self.is_sdxl:
            positive = self._encode_sd15(prompt)
            negative = self._encode_sd15(negative_prompt or "") if with_negative else None
            return PromptEmbeddings(positive, negative)
        positive, pooled = self._encode_sdxl(prompt)
        if not with_negative:
            return PromptEmbeddings(positive, None, pooled)
        if negative_prompt is None and self.force_zeros_for_empty_prompt:
            return PromptEmbeddings(positive, torch.zeros_like(positive), pooled, torch.zeros_like(pooled))
        negative, negative_pooled = self._encode_sdxl(negative_prompt or "")
        return PromptEmbeddings(positive, negative, pooled, negative_pooled)


class EmbeddingCache:
    """LRU of encoded prompts, keyed by model id and prompt digests (never the prompt text)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[Hashable, PromptEmbeddings] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> PromptEmbeddings | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: PromptEmbeddings) -> None:
        if self._capacity <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
