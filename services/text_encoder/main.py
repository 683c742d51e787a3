"""The text_encoder process: `diffmesh serve text_encoder` or `python -m services.text_encoder`."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import torch

from diffmesh.models.pool import ModelPool
from diffmesh.models.registry import ModelEntry
from diffmesh.limits import MIB, PromptLimits, TokenWindowLimits
from diffmesh.runtime.config import ServerConfig, setting
from diffmesh.runtime.server import run_stage
from diffmesh.runtime.stage import ModelStage
from diffmesh.stages import STAGES
from services.text_encoder.encoder import ClipPromptEncoder, EmbeddingCache
from services.text_encoder.servicer import TextEncoderServicer


@dataclass
class TextEncoderConfig(PromptLimits, TokenWindowLimits, ServerConfig):
    """diffmesh text_encoder: prompts -> CLIP embeddings."""

    port: int = setting(STAGES["text_encoder"].default_port, "gRPC port", min=0, max=65535)
    cache_size: int = setting(1024, "encoded prompts kept in the LRU cache (0: no cache)", min=0)
    cache_mb: int = setting(256, "memory the LRU cache's embeddings may hold, MiB (least recently used "
                                 "entries go first)", min=0)


class TextEncoderStage(ModelStage[ClipPromptEncoder]):
    name = "text_encoder"

    def load_model(self, entry: ModelEntry, device: torch.device, dtype: torch.dtype) -> ClipPromptEncoder:
        return ClipPromptEncoder(entry, device, dtype)

    def servicer(self, models: ModelPool[ClipPromptEncoder]) -> TextEncoderServicer:
        config: TextEncoderConfig = self.config  # type: ignore[assignment]
        cache = EmbeddingCache(config.cache_size, max_bytes=config.cache_mb * MIB)
        return TextEncoderServicer(models, self.admission, cache, max_prompt_chars=config.max_prompt_chars,
                                   max_prompt_windows=config.max_prompt_windows)


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(TextEncoderStage, TextEncoderConfig, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
