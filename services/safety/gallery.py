"""Protected-identity gallery: the faces an operator protects, as normalised face embeddings.

File format: a NumPy .npz (loaded with allow_pickle=False, so it holds plain arrays only) with

- `ids`        str   [N]     opaque, unique entry names chosen by the operator ("person-0001")
- `models`     str   [N]     the embedding model of each entry, exactly the face stage's
                             `embedding_model` string ("dlib-resnet-128", "arcface-512 (antelopev2)")
- `embeddings` float [N, D]  one L2-normalised embedding per row
- `dims`       int   [N]     optional: entry i is embeddings[i, :dims[i]] and the rest of its row
                             is zero, so models with different dimensions share one file; absent:
                             every entry uses all D values

Every entry of one model has the same dimension. Only entries of the face's own model are compared
with it: embeddings of different models live in unrelated spaces.

Embeddings are personal data: nothing here logs them or puts them in an error or a repr. Errors
name the file, the entry index and its id.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

# How far from 1 a stored embedding's norm may be (float32 rounding, not unnormalised data).
NORM_TOLERANCE = 1e-3
ARRAYS = ("ids", "models", "embeddings")


class GalleryError(ValueError):
    """A gallery file or entry that cannot be used."""


@dataclass(frozen=True, eq=False)
class GalleryEntry:
    id: str
    embedding_model: str
    embedding: np.ndarray = field(repr=False)


@dataclass(frozen=True, eq=False)
class _ModelEntries:
    ids: tuple[str, ...]
    matrix: np.ndarray       # float32 [n, d], unit rows


class Gallery:
    """Loaded, validated entries grouped by embedding model."""

    def __init__(self, entries: Mapping[str, _ModelEntries], source: str) -> None:
        self._by_model = dict(entries)
        self.source = source

    def __len__(self) -> int:
        return sum(len(group.ids) for group in self._by_model.values())

    @property
    def models(self) -> frozenset[str]:
        return frozenset(self._by_model)

    def dim(self, embedding_model: str) -> int:
        return self._by_model[embedding_model].matrix.shape[1]

    def match(self, embedding: np.ndarray, embedding_model: str) -> tuple[str | None, float]:
        """The entry of `embedding_model` most similar to `embedding` and its cosine similarity;
        (None, -1.0) when the gallery has no entry of that model."""
        group = self._by_model.get(embedding_model)
        if group is None:
            return None, -1.0
        query = np.asarray(embedding, dtype=np.float32)
        if query.ndim != 1 or query.shape[0] != group.matrix.shape[1]:
            raise ValueError(f"a {embedding_model!r} face embedding has shape {query.shape}; the gallery's "
                             f"{embedding_model!r} entries are {group.matrix.shape[1]}-d")
        if not np.all(np.isfinite(query)):
            raise ValueError("the face embedding has non-finite values")
        norm = float(np.linalg.norm(query))
        if norm == 0.0:
            raise ValueError("the face embedding has zero norm")
        similarities = group.matrix @ (query / norm)
        best = int(np.argmax(similarities))
        return group.ids[best], float(np.clip(similarities[best], -1.0, 1.0))

    def __repr__(self) -> str:
        counts = {model: len(group.ids) for model, group in sorted(self._by_model.items())}
        return f"Gallery(source={self.source!r}, entries={counts})"


def load_gallery(path: str | os.PathLike) -> Gallery:
    """The gallery in the .npz at `path`; GalleryError naming the file and entry when it is not valid."""
    source = str(path)
    if not Path(source).is_file():
        raise FileNotFoundError(f"protected-identity gallery not found: {source}")
    try:
        with np.load(source, allow_pickle=False) as archive:
            missing = [name for name in ARRAYS if name not in archive.files]
            if missing:
                raise GalleryError(f"{source}: missing arrays {missing} (a gallery has {list(ARRAYS)}"
                                   f" and optionally 'dims')")
            ids, models, embeddings = (archive[name] for name in ARRAYS)
            dims = archive["dims"] if "dims" in archive.files else None
    except GalleryError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        # allow_pickle=False refuses object arrays with a ValueError: say what the file should be.
        raise GalleryError(f"{source}: not a gallery .npz of plain arrays ({type(error).__name__}: {error})") from None
    return Gallery(_group(_entries_from_arrays(source, ids, models, embeddings, dims), source), source)


def save_gallery(path: str | os.PathLike, entries: Iterable[GalleryEntry]) -> int:
    """Write `entries` as a gallery .npz (embeddings L2-normalised here; cosine similarity does not
    depend on their scale). Validated as load_gallery validates; the file is replaced atomically
    and created readable by its owner only. Returns the number of entries written."""
    target = str(path)
    normalised = [GalleryEntry(e.id, e.embedding_model, _normalised(target, i, e)) for i, e in enumerate(entries)]
    if not normalised:
        raise GalleryError(f"{target}: no entries to write")
    _group(normalised, target)
    width = max((len(e.embedding) for e in normalised), default=0)
    embeddings = np.zeros((len(normalised), width), dtype=np.float32)
    for i, entry in enumerate(normalised):
        embeddings[i, :len(entry.embedding)] = entry.embedding
    arrays = {"ids": np.array([e.id for e in normalised], dtype=np.str_),
              "models": np.array([e.embedding_model for e in normalised], dtype=np.str_),
              "embeddings": embeddings,
              "dims": np.array([len(e.embedding) for e in normalised], dtype=np.int64)}
    directory = os.path.dirname(os.path.abspath(target))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".gallery-", suffix=".npz")  # mode 0600
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise
    return len(normalised)


def _normalised(source: str, index: int, entry: GalleryEntry) -> np.ndarray:
    vector = np.asarray(entry.embedding, dtype=np.float64)
    if vector.ndim != 1 or vector.shape[0] == 0:
        raise GalleryError(f"{source}: entry {index} ({entry.id!r}): embedding must be a non-empty vector, "
                           f"got shape {vector.shape}")
    if not np.all(np.isfinite(vector)):
        raise GalleryError(f"{source}: entry {index} ({entry.id!r}): embedding has non-finite values")
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise GalleryError(f"{source}: entry {index} ({entry.id!r}): embedding has zero norm")
    return (vector / norm).astype(np.float32)


def _entries_from_arrays(source: str, ids: np.ndarray, models: np.ndarray, embeddings: np.ndarray,
                         dims: np.ndarray | None) -> list[GalleryEntry]:
    for name, array in (("ids", ids), ("models", models)):
        if array.ndim != 1 or array.dtype.kind != "U":
            raise GalleryError(f"{source}: '{name}' must be a 1-d array of strings, got {array.dtype} {array.shape}")
    if embeddings.ndim != 2 or embeddings.dtype.kind != "f":
        raise GalleryError(f"{source}: 'embeddings' must be a 2-d float array [N, D], got "
                           f"{embeddings.dtype} {embeddings.shape}")
    count = embeddings.shape[0]
    if not (len(ids) == len(models) == count):
        raise GalleryError(f"{source}: {len(ids)} ids, {len(models)} models and {count} embeddings: "
                           "one of each per entry")
    if count == 0:
        raise GalleryError(f"{source}: the gallery has no entries")
    width = embeddings.shape[1]
    if dims is None:
        dims = np.full(count, width)
    elif dims.ndim != 1 or dims.dtype.kind not in "iu" or len(dims) != count:
        raise GalleryError(f"{source}: 'dims' must be a 1-d integer array with one value per entry, got "
                           f"{dims.dtype} {dims.shape}")
    entries = []
    for index in range(count):
        entry_id, dim = str(ids[index]), int(dims[index])
        where = f"{source}: entry {index} ({entry_id!r})"
        if not 1 <= dim <= width:
            raise GalleryError(f"{where}: dims {dim} outside [1, {width}]")
        row = embeddings[index].astype(np.float32)
        if not np.all(np.isfinite(row)):
            raise GalleryError(f"{where}: embedding has non-finite values")
        if np.any(row[dim:] != 0):
            raise GalleryError(f"{where}: embedding has non-zero values past its dims ({dim})")
        vector = row[:dim]
        norm = float(np.linalg.norm(vector))
        if norm == 0.0:
            raise GalleryError(f"{where}: embedding has zero norm")
        if abs(norm - 1.0) > NORM_TOLERANCE:
            raise GalleryError(f"{where}: embedding is not L2-normalised (norm {norm:.4f}); build galleries "
                               "with save_gallery, which normalises")
        entries.append(GalleryEntry(entry_id, str(models[index]), vector))
    return entries


def _group(entries: list[GalleryEntry], source: str) -> dict[str, _ModelEntries]:
    """Entries by model, checking ids (non-empty, unique), models (non-empty) and one dimension per model."""
    seen: dict[str, int] = {}
    first_of_model: dict[str, int] = {}
    rows: dict[str, list[GalleryEntry]] = {}
    for index, entry in enumerate(entries):
        where = f"{source}: entry {index} ({entry.id!r})"
        if not entry.id:
            raise GalleryError(f"{source}: entry {index}: empty id")
        if entry.id in seen:
            raise GalleryError(f"{where}: duplicate id (also entry {seen[entry.id]})")
        if not entry.embedding_model:
            raise GalleryError(f"{where}: empty embedding model")
        seen[entry.id] = index
        model = entry.embedding_model
        if model in first_of_model:
            first = first_of_model[model]
            expected = len(entries[first].embedding)
            if len(entry.embedding) != expected:
                raise GalleryError(f"{where}: {len(entry.embedding)}-d embedding, but model {model!r} has "
                                   f"{expected}-d embeddings (entry {first})")
        else:
            first_of_model[model] = index
        rows.setdefault(model, []).append(entry)
    return {model: _ModelEntries(tuple(e.id for e in group), np.stack([e.embedding for e in group]).astype(np.float32))
            for model, group in rows.items()}
