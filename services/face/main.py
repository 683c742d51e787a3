"""The face process: `diffmesh serve face` or `python -m services.face`."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from diffmesh.limits import BatchLimits, FaceLimits, ImageMemoryLimits, ImageSizeLimits
from diffmesh.models.pool import ModelPool
from diffmesh.models.registry import Kind, ModelEntry, ModelError
from diffmesh.runtime.config import ServerConfig, setting
from diffmesh.runtime.server import run_stage
from diffmesh.runtime.stage import ModelStage
from diffmesh.stages import STAGES
from services.face.analysis import FaceAnalyzer, load_face_pack
from services.face.servicer import FaceModels, FaceServicer

FaceModel = Any  # a FaceAnalyzer (face_analysis) or an IdentityEncoder (identity_encoder)


@dataclass
class FaceConfig(ImageSizeLimits, BatchLimits, ImageMemoryLimits, FaceLimits, ServerConfig):
    """diffmesh face: face analysis and identity encoding."""

    port: int = setting(STAGES["face"].default_port, "gRPC port", min=0, max=65535)
    default_face_model: str = setting("", "the face_analysis pack of requests that name none (empty: the "
                                          "first loaded, by id)")


class FaceStage(ModelStage[FaceModel]):
    name = "face"

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(config)
        self._kinds: dict[str, Kind] = {}

    def load_model(self, entry: ModelEntry, device: torch.device, dtype: torch.dtype) -> FaceModel:
        self._kinds[entry.id] = entry.kind
        if entry.kind is Kind.FACE_ANALYSIS:
            return load_face_pack(entry, str(device))
        # torch + transformers' CLIP only where the registry has an identity encoder
        from diffmesh.models.photomaker import load_identity_encoder
        return load_identity_encoder(entry, device, dtype)

    def servicer(self, models: ModelPool[FaceModel]) -> FaceServicer:
        config: FaceConfig = self.config  # type: ignore[assignment]
        loaded = {model_id: models.get(model_id) for model_id in models.ids()}
        packs: dict[str, FaceAnalyzer] = {i: m for i, m in loaded.items() if self._kinds[i] is Kind.FACE_ANALYSIS}
        encoders = {i: m for i, m in loaded.items() if self._kinds[i] is Kind.IDENTITY_ENCODER}
        if not packs:
            raise ModelError(f"the face stage needs a face_analysis pack; registry {config.registry} has none loaded")
        default = config.default_face_model or sorted(packs)[0]
        if default not in packs:
            raise ModelError(f"default_face_model {default!r} is not a loaded face_analysis pack "
                             f"(loaded: {', '.join(sorted(packs))})")
        return FaceServicer(FaceModels(packs, encoders, default), self.admission, config.max_batch,
                            config.max_image_decode_bytes, config.max_detected_faces, config.max_reference_faces)


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(FaceStage, FaceConfig, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
