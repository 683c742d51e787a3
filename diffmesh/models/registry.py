"""The model registry: a YAML file mapping model ids to model files and directories, each of a kind.

```yaml
models:
  tiny-sd15: {path: tiny-sd15}      # relative paths resolve against the registry file's folder
  sdxl-base: {path: /models/sdxl-base-1.0, kind: pipeline}   # kind defaults to pipeline
  faces: {path: /models/antelopev2, kind: face_analysis}
  photomaker: {path: /models/photomaker-v2.bin, kind: identity_encoder, base: sdxl-base}
  pixel-art: {path: /models/pixel-art.safetensors, kind: lora, base: sdxl-base}
```

Loading the file only parses it (ids, kinds, adapters' bases): paths are checked when an entry is
asked for (``get``) or all at once (``verify``), so that ``diffmesh models list`` can still print a
registry whose volume is not mounted, while a service start-up fails with an error naming the
missing path. Every selection takes ``kinds`` so that a stage checks only what it loads: an
unmounted face pack must not stop the text encoder.
"""

from __future__ import annotations

import enum
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

MODEL_INDEX = "model_index.json"


class ModelError(Exception):
    """A model or registry problem; the message always names the offending path or id."""


class UnknownModelError(ModelError, KeyError):
    """The requested id is not in the registry. A KeyError too, so mapping-style callers work."""

    def __str__(self) -> str:
        # KeyError.__str__ repr()s its argument, which would wrap the message in quotes.
        return str(self.args[0]) if self.args else ""


class ModelFamily(str, enum.Enum):
    SD15 = "sd15"
    SDXL = "sdxl"


class Kind(str, enum.Enum):
    """What a registry entry is, hence which stages load it (diffmesh.stages StageSpec.loads)."""

    PIPELINE = "pipeline"                  # a diffusers SD 1.x / SDXL pipeline directory
    FACE_ANALYSIS = "face_analysis"        # an insightface model pack directory
    IDENTITY_ENCODER = "identity_encoder"  # e.g. a PhotoMaker checkpoint file
    LORA = "lora"
    CONTROLNET = "controlnet"
    IP_ADAPTER = "ip_adapter"
    SAFETY_POLICY = "safety_policy"


# Adapters only make sense on top of one pipeline, so their entry must say which (``base:``). An
# identity encoder is one too: PhotoMaker's checkpoint carries a LoRA for its pipeline's UNet.
ADAPTER_KINDS: frozenset[Kind] = frozenset({Kind.LORA, Kind.CONTROLNET, Kind.IP_ADAPTER, Kind.IDENTITY_ENCODER})
ENTRY_KEYS: tuple[str, ...] = ("path", "kind", "base")

# Img2img pipeline classes share their txt2img sibling's components, so a directory saved from
# either is the same family.
_FAMILY_BY_CLASS: dict[str, ModelFamily] = {
    "StableDiffusionPipeline": ModelFamily.SD15,
    "StableDiffusionImg2ImgPipeline": ModelFamily.SD15,
    "StableDiffusionXLPipeline": ModelFamily.SDXL,
    "StableDiffusionXLImg2ImgPipeline": ModelFamily.SDXL,
}


def known_kinds() -> str:
    return ", ".join(kind.value for kind in Kind)


def parse_kind(value: object) -> Kind:
    """A Kind from its name; ModelError listing the known kinds otherwise."""
    if isinstance(value, Kind):
        return value
    try:
        return Kind(value)
    except ValueError:
        raise ModelError(f"unknown kind {value!r} (known kinds: {known_kinds()})") from None


def parse_kinds(kinds: str | Iterable[str | Kind] | None) -> frozenset[Kind] | None:
    """The selection a caller asked for: None means every kind. A typo in a stage's ``loads``
    must fail loudly, not select nothing."""
    if kinds is None:
        return None
    if isinstance(kinds, str):  # one kind given bare: do not iterate its characters
        kinds = (kinds,)
    return frozenset(parse_kind(kind) for kind in kinds)


def detect_family(model_dir: Path) -> ModelFamily:
    """Family of a diffusers pipeline directory, from model_index.json's ``_class_name``."""
    index_path = Path(model_dir) / MODEL_INDEX
    if not index_path.is_file():
        raise ModelError(f"{index_path}: not found (not a diffusers pipeline directory)")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{index_path}: cannot read: {exc}") from exc
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    family = _FAMILY_BY_CLASS.get(class_name) if isinstance(class_name, str) else None
    if family is None:
        raise ModelError(
            f"{index_path}: unsupported pipeline class {class_name!r} "
            f"(supported: {', '.join(sorted(_FAMILY_BY_CLASS))})"
        )
    return family


@dataclass(frozen=True)
class EntrySpec:
    """One parsed registry line: what the file says, nothing checked on disk yet."""

    path: Path
    kind: Kind = Kind.PIPELINE
    base: str | None = None  # adapters only: the pipeline id they apply to


@dataclass(frozen=True)
class ModelEntry:
    id: str
    path: Path
    family: ModelFamily | None  # pipelines only; None for every other kind
    kind: Kind = Kind.PIPELINE
    base: str | None = None     # adapters only: the id of the pipeline entry they apply to

    def component_dir(self, name: str) -> Path:
        """``path/name`` (e.g. "unet", "tokenizer_2"), which must exist."""
        component = self.path / name
        if not component.is_dir():
            raise ModelError(f"model {self.id!r}: component directory {component} not found")
        return component


@dataclass(frozen=True)
class Registry:
    """Parsed registry: id -> resolved absolute path, kind and base. Entries are validated on access."""

    source: Path
    specs: Mapping[str, EntrySpec]

    @classmethod
    def load(cls, path: Path) -> Registry:
        path = Path(path)
        raw = _read_yaml(path)
        if raw is None:
            raise ModelError(f"{path}: registry file is empty (expected a 'models:' mapping)")
        models = raw.get("models") if isinstance(raw, dict) else None
        if not isinstance(models, dict):
            raise ModelError(f"{path}: expected a top-level 'models:' mapping of id -> {{path: ...}}")
        return cls(source=path, specs=_parse_models(path, models))

    @property
    def paths(self) -> Mapping[str, Path]:
        return {model_id: spec.path for model_id, spec in self.specs.items()}

    def ids(self, kinds: str | Iterable[str | Kind] | None = None) -> list[str]:
        """Sorted ids, only those of the given kinds (None: all)."""
        selected = parse_kinds(kinds)
        return sorted(model_id for model_id, spec in self.specs.items()
                      if selected is None or spec.kind in selected)

    def kind_of(self, model_id: str) -> Kind:
        return self._spec(model_id).kind

    def path_of(self, model_id: str) -> Path:
        """The resolved path of an id, without checking that it exists."""
        return self._spec(model_id).path

    def get(self, model_id: str) -> ModelEntry:
        """The entry, checked on disk: a pipeline must be a diffusers directory, anything else
        must at least exist (its loader knows its format)."""
        spec = self._spec(model_id)
        if spec.kind is Kind.PIPELINE:
            return ModelEntry(id=model_id, path=spec.path, family=self._pipeline_family(model_id, spec.path))
        if not spec.path.exists():
            raise ModelError(f"model {model_id!r} ({spec.kind.value}): path {spec.path} not found "
                             f"(registry {self.source})")
        return ModelEntry(id=model_id, path=spec.path, family=None, kind=spec.kind, base=spec.base)

    def entries(self, kinds: str | Iterable[str | Kind] | None = None) -> list[ModelEntry]:
        return [self.get(model_id) for model_id in self.ids(kinds)]

    def verify(self, kinds: str | Iterable[str | Kind] | None = None) -> None:
        """Raise one ModelError listing every selected entry that is missing or malformed;
        entries of other kinds are not looked at."""
        problems: list[str] = []
        for model_id in self.ids(kinds):
            try:
                self.get(model_id)
            except ModelError as exc:
                problems.append(str(exc))
        if problems:
            raise ModelError(f"registry {self.source}: " + "; ".join(problems))

    def _pipeline_family(self, model_id: str, model_dir: Path) -> ModelFamily:
        if not model_dir.is_dir():
            raise ModelError(
                f"model {model_id!r}: directory {model_dir} not found (registry {self.source})"
            )
        try:
            return detect_family(model_dir)
        except ModelError as exc:
            raise ModelError(f"model {model_id!r}: {exc}") from exc

    def _spec(self, model_id: str) -> EntrySpec:
        try:
            return self.specs[model_id]
        except KeyError:
            raise self._unknown(model_id) from None

    def _unknown(self, model_id: str) -> UnknownModelError:
        known = ", ".join(self.ids()) or "(none)"
        return UnknownModelError(
            f"unknown model id {model_id!r} in registry {self.source}; known ids: {known}"
        )


def _parse_models(source: Path, models: Mapping[Any, Any]) -> dict[str, EntrySpec]:
    """Every entry of a ``models:`` mapping, then the adapters' bases (which need all entries)."""
    base_dir = source.resolve().parent
    specs = {_parse_id(source, model_id): _parse_entry(source, base_dir, model_id, spec)
             for model_id, spec in models.items()}
    for model_id, spec in specs.items():
        _check_base(source, specs, model_id, spec)
    return specs


def _parse_id(source: Path, model_id: object) -> str:
    if not isinstance(model_id, str) or not model_id:
        raise ModelError(f"{source}: model id {model_id!r} must be a non-empty string")
    return model_id


def _parse_entry(source: Path, base_dir: Path, model_id: str, spec: object) -> EntrySpec:
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str) or not spec["path"]:
        raise ModelError(f"{source}: model {model_id!r} needs a 'path:' string, got {spec!r}")
    # A misspelt key ("bsae:") would otherwise be dropped silently and surface much later.
    unknown = sorted(str(key) for key in spec if key not in ENTRY_KEYS)
    if unknown:
        raise ModelError(f"{source}: model {model_id!r}: unknown key(s) {', '.join(unknown)} "
                         f"(known: {', '.join(ENTRY_KEYS)})")
    try:
        kind = parse_kind(spec.get("kind", Kind.PIPELINE.value))
    except ModelError as exc:
        raise ModelError(f"{source}: model {model_id!r}: {exc}") from None
    base = spec.get("base")
    if base is not None and not (isinstance(base, str) and base):
        raise ModelError(f"{source}: model {model_id!r}: 'base:' must be a model id, got {base!r}")
    return EntrySpec(path=_resolve(base_dir, spec["path"]), kind=kind, base=base)


def _check_base(source: Path, specs: Mapping[str, EntrySpec], model_id: str, spec: EntrySpec) -> None:
    if spec.kind not in ADAPTER_KINDS:
        if spec.base is not None:
            raise ModelError(f"{source}: model {model_id!r}: 'base:' is only for adapter kinds "
                             f"({', '.join(sorted(k.value for k in ADAPTER_KINDS))}), "
                             f"not {spec.kind.value}")
        return
    if spec.base is None:
        raise ModelError(f"{source}: model {model_id!r} ({spec.kind.value}) needs 'base:', "
                         f"the id of the pipeline entry it applies to")
    target = specs.get(spec.base)
    if target is None or target.kind is not Kind.PIPELINE:
        pipelines = ", ".join(sorted(i for i, s in specs.items() if s.kind is Kind.PIPELINE)) or "(none)"
        found = "not in the registry" if target is None else f"a {target.kind.value} entry"
        raise ModelError(f"{source}: model {model_id!r} ({spec.kind.value}): base {spec.base!r} is {found}; "
                         f"it must be a pipeline id: {pipelines}")


def _resolve(base: Path, raw: str) -> Path:
    # expanduser so "~/models/x" works in dev configs; relative paths anchor on the registry file,
    # never the process cwd, so the same file works from any directory.
    p = Path(os.path.expanduser(raw))
    return p if p.is_absolute() else (base / p)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError(f"{path}: registry file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot read registry file: {exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ModelError(f"{path}: malformed registry YAML: {exc}") from exc


@dataclass(frozen=True)
class RegistryItem:
    """An entry to write (write_registry): a path with its kind, and its base for an adapter."""

    path: Path | str
    kind: Kind | str = Kind.PIPELINE
    base: str | None = None


def write_registry(path: Path, models: Mapping[str, Path | str | RegistryItem]) -> Path:
    """Add or replace ``models`` in the registry at ``path``, keeping other ids as they are (kind,
    base and all).

    A bare path means a pipeline directory (what the tiny builder writes); a RegistryItem gives
    the kind and base. Absolute paths under the registry's folder are written relative to it, so
    the whole tree can be moved or mounted elsewhere; other absolute ones stay absolute. A relative
    path is written as given, i.e. it means "relative to the registry file", as in the file itself.
    The merged result is validated before it replaces the file, so a bad merge never leaves a
    registry that no service can load.
    """
    path = Path(path)
    existing: dict[str, Any] = {}
    other_keys: dict[str, Any] = {}
    if path.exists():
        raw = _read_yaml(path)
        if raw is not None:
            if not isinstance(raw, dict) or not isinstance(raw.get("models", {}), dict):
                raise ModelError(f"{path}: cannot merge into a registry without a 'models:' mapping")
            existing = dict(raw.get("models") or {})
            other_keys = {k: v for k, v in raw.items() if k != "models"}

    base = path.resolve().parent
    for model_id, item in models.items():
        existing[model_id] = _item_yaml(base, item if isinstance(item, RegistryItem) else RegistryItem(item))

    merged = {k: existing[k] for k in sorted(existing)}
    _parse_models(path, merged)
    doc = {**other_keys, "models": merged}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write-then-rename: a service reading the registry never sees a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(doc, fh, sort_keys=False, default_flow_style=False)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the registry from other service users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _item_yaml(base: Path, item: RegistryItem) -> dict[str, str]:
    # The default kind is left out so pipeline entries read exactly as before kinds existed.
    kind = parse_kind(item.kind)
    entry = {"path": _relative_if_under(base, Path(item.path))}
    if kind is not Kind.PIPELINE:
        entry["kind"] = kind.value
    if item.base is not None:
        entry["base"] = item.base
    return entry


def _relative_if_under(base: Path, model_dir: Path) -> str:
    if not model_dir.is_absolute():
        return model_dir.as_posix()
    resolved = model_dir.resolve()
    try:
        return resolved.relative_to(base).as_posix()
    except ValueError:
        return str(resolved)
