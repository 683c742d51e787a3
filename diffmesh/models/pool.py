"""The models a stage has loaded, by id: loaded once at start-up, looked up per request."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Generic, Sequence, TypeVar

from diffmesh.models.registry import ADAPTER_KINDS, Kind, ModelEntry, ModelError, Registry, parse_kinds
from diffmesh.errors import InvalidArgument

M = TypeVar("M")

# What a stage loads when its caller does not say: the only kind that existed before kinds did.
DEFAULT_KINDS: tuple[str, ...] = (Kind.PIPELINE.value,)


class ModelPool(Generic[M]):
    def __init__(self) -> None:
        self._models: dict[str, M] = {}

    def load(self, registry_path: str | Path, model_ids: Sequence[str],
             factory: Callable[[ModelEntry], M], kinds: Sequence[str] = DEFAULT_KINDS) -> None:
        """Loads the given ids (every registry entry of ``kinds`` when empty); raises ModelError
        naming the path of anything missing or broken, so start-up fails loudly instead of serving
        fakes. Entries of other kinds are never checked: they belong to other stages. Adapter
        kinds (registry.ADAPTER_KINDS) load after every other entry, so a factory can attach an
        adapter to its already loaded base pipeline."""
        registry = Registry.load(Path(registry_path))
        wanted = list(model_ids) or registry.ids(kinds)
        # Check every requested id's kind before loading any: a bad --models flag should fail in
        # milliseconds, not after minutes of loading weights.
        for model_id in wanted:
            _require_kind(registry, model_id, kinds)
        for model_id in sorted(wanted, key=lambda i: registry.kind_of(i) in ADAPTER_KINDS):  # stable: ids in order
            self._models[model_id] = factory(registry.get(model_id))

    def ids(self) -> list[str]:
        return sorted(self._models)

    def subset(self, model_ids: Sequence[str]) -> ModelPool[M]:
        """A pool of only these loaded models (the ones a servicer serves by model_id, when the
        stage also loaded entries of other kinds)."""
        pool: ModelPool[M] = ModelPool()
        pool._models = {model_id: self._models[model_id] for model_id in model_ids}
        return pool

    def get(self, model_id: str, field: str = "model_id") -> M:
        model = self._models.get(model_id)
        if model is None:
            raise InvalidArgument(field, model_id, f"unknown model; loaded: {', '.join(self.ids())}")
        return model


def _require_kind(registry: Registry, model_id: str, kinds: Sequence[str]) -> None:
    kind = registry.kind_of(model_id)  # an unknown id raises UnknownModelError listing the known
    selected = parse_kinds(kinds)
    if selected is not None and kind not in selected:
        loads = ", ".join(sorted(k.value for k in selected)) or "nothing"
        raise ModelError(f"model {model_id!r} is a {kind.value} entry (registry {registry.source}); "
                         f"this stage does not load {kind.value} (it loads: {loads})")
