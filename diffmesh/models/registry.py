"""The model registry: a YAML file mapping model ids to diffusers-format directories.

```yaml
models:
  tiny-sd15: {path: tiny-sd15}      # relative paths resolve against the registry file's folder
  sdxl-base: {path: /models/sdxl-base-1.0}
```

Loading the file only parses it: directories are checked when an entry is asked for (``get``) or
all at once (``verify``), so that ``diffmesh models list`` can still print a registry whose volume
is not mounted, while a service start-up fails with an error naming the missing path.
"""

from __future__ import annotations

import enum
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

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


# Img2img pipeline classes share their txt2img sibling's components, so a directory saved from
# either is the same family.
_FAMILY_BY_CLASS: dict[str, ModelFamily] = {
    "StableDiffusionPipeline": ModelFamily.SD15,
    "StableDiffusionImg2ImgPipeline": ModelFamily.SD15,
    "StableDiffusionXLPipeline": ModelFamily.SDXL,
    "StableDiffusionXLImg2ImgPipeline": ModelFamily.SDXL,
}


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
class ModelEntry:
    id: str
    path: Path
    family: ModelFamily

    def component_dir(self, name: str) -> Path:
        """``path/name`` (e.g. "unet", "tokenizer_2"), which must exist."""
        component = self.path / name
        if not component.is_dir():
            raise ModelError(f"model {self.id!r}: component directory {component} not found")
        return component


@dataclass(frozen=True)
class Registry:
    """Parsed registry: id -> resolved absolute directory. Entries are validated on access."""

    source: Path
    paths: Mapping[str, Path]

    @classmethod
    def load(cls, path: Path) -> Registry:
        path = Path(path)
        raw = _read_yaml(path)
        if raw is None:
            raise ModelError(f"{path}: registry file is empty (expected a 'models:' mapping)")
        models = raw.get("models") if isinstance(raw, dict) else None
        if not isinstance(models, dict):
            raise ModelError(f"{path}: expected a top-level 'models:' mapping of id -> {{path: ...}}")
        base = path.resolve().parent
        paths: dict[str, Path] = {}
        for model_id, spec in models.items():
            if not isinstance(model_id, str) or not model_id:
                raise ModelError(f"{path}: model id {model_id!r} must be a non-empty string")
            if not isinstance(spec, dict) or not isinstance(spec.get("path"), str) or not spec["path"]:
                raise ModelError(f"{path}: model {model_id!r} needs a 'path:' string, got {spec!r}")
            paths[model_id] = _resolve(base, spec["path"])
        return cls(source=path, paths=paths)

    def ids(self) -> list[str]:
        return sorted(self.paths)

    def path_of(self, model_id: str) -> Path:
        """The resolved directory of an id, without checking that it exists."""
        try:
            return self.paths[model_id]
        except KeyError:
            raise self._unknown(model_id) from None

    def get(self, model_id: str) -> ModelEntry:
        model_dir = self.path_of(model_id)
        if not model_dir.is_dir():
            raise ModelError(
                f"model {model_id!r}: directory {model_dir} not found (registry {self.source})"
            )
        try:
            family = detect_family(model_dir)
        except ModelError as exc:
            raise ModelError(f"model {model_id!r}: {exc}") from exc
        return ModelEntry(id=model_id, path=model_dir, family=family)

    def entries(self) -> list[ModelEntry]:
        return [self.get(model_id) for model_id in self.ids()]

    def verify(self) -> None:
        """Raise one ModelError listing every entry that is missing or not a pipeline directory."""
        problems: list[str] = []
        for model_id in self.ids():
            try:
                self.get(model_id)
            except ModelError as exc:
                problems.append(str(exc))
        if problems:
            raise ModelError(f"registry {self.source}: " + "; ".join(problems))

    def _unknown(self, model_id: str) -> UnknownModelError:
        known = ", ".join(self.ids()) or "(none)"
        return UnknownModelError(
            f"unknown model id {model_id!r} in registry {self.source}; known ids: {known}"
        )


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


def write_registry(path: Path, models: Mapping[str, Path | str]) -> Path:
    """Add or replace ``models`` (id -> directory) in the registry at ``path``, keeping other ids.

    Absolute directories under the registry's folder are written relative to it, so the whole tree
    can be moved or mounted elsewhere; other absolute ones stay absolute. A relative directory is
    written as given, i.e. it means "relative to the registry file", as in the file itself.
    """
    path = Path(path)
    existing: dict[str, Any] = {}
    if path.exists():
        raw = _read_yaml(path)
        if raw is not None:
            if not isinstance(raw, dict) or not isinstance(raw.get("models", {}), dict):
                raise ModelError(f"{path}: cannot merge into a registry without a 'models:' mapping")
            existing = dict(raw.get("models") or {})
            other_keys = {k: v for k, v in raw.items() if k != "models"}
        else:
            other_keys = {}
    else:
        other_keys = {}

    base = path.resolve().parent
    for model_id, model_dir in models.items():
        existing[model_id] = {"path": _relative_if_under(base, Path(model_dir))}

    doc = {**other_keys, "models": {k: existing[k] for k in sorted(existing)}}
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


def _relative_if_under(base: Path, model_dir: Path) -> str:
    if not model_dir.is_absolute():
        return model_dir.as_posix()
    resolved = model_dir.resolve()
    try:
        return resolved.relative_to(base).as_posix()
    except ValueError:
        return str(resolved)
