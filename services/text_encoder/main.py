"""The text_encoder process: `diffmesh serve text_encoder` or `python -m services.text_encoder`."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import torch

from diffmesh.models.pool import ModelPool
from diffmesh.models.registry import ModelEntry
from diffmesh.runtime.config import ServerConfig, setting
from diffmesh.runtime.server import run_stage
from diffmesh.runtime.stage import ModelStage
from diffmesh.stages import STAGES
from services.text_encoder.encoder import ClipPromptEncoder, EmbeddingCache
from services.text_encoder.servicer import TextEncoderServicer


@dataclass
class TextEncoderConfig(ServerConfig):
    """diffmesh text_encoder: prompts -> CLIP embeddings."""

    port: int = setting(STAGES["text_encoder"].default_port, "gRPC port", min=0, max=65535)
    cache_size: int = setting(1024, "encoded prompts kept in the LRU cache (0: no cache)", min=0)


class TextEncoderStage(ModelStage[ClipPromptEncoder]):
    name = "text_encoder"

    def load_model(self, entry: ModelEntry, device: torch.device, dtype: torch.dtype) -> ClipPromptEncoder:
        return ClipPromptEncoder(entry, device, dtype)

    def servicer(self, models: ModelPool[ClipPromptEncoder]) -> TextEncoderServicer:
        config: TextEncoderConfig = self.config  # type: ignore[assignment]
        return TextEncoderServicer(models, self.admission, EmbeddingCache(config.cache_size))


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(TextEncoderStage, TextEncoderConfig, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
