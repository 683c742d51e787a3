"""The models a stage has loaded, by id: loaded once at start-up, looked up per request."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Generic, Sequence, TypeVar

from diffmesh.models.registry import ModelEntry, Registry
from diffmesh.errors import InvalidArgument

M = TypeVar("M")


class ModelPool(Generic[M]):
    def __init__(self) -> None:
        self._models: dict[str, M] = {}

    def load(self, registry_path: str | Path, model_ids: Sequence[str],
             factory: Callable[[ModelEntry], M]) -> None:
        """Loads the given ids (every registry entry when empty); raises ModelError naming the
        path of anything missing or broken, so start-up fails loudly instead of serving fakes."""
        registry = Registry.load(Path(registry_path))
        for model_id in model_ids or registry.ids():
            self._models[model_id] = factory(registry.get(model_id))

    def ids(self) -> list[str]:
        return sorted(self._models)

    def get(self, model_id: str, field: str = "model_id") -> M:
        model = self._models.get(model_id)
        if model is None:
            raise InvalidArgument(field, model_id, f"unknown model; loaded: {', '.join(self.ids())}")
        return model
