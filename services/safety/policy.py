"""The policy file: YAML in, a validated `Policy` out (the schema is documented at the top of
policies/default.yaml).

Validation is strict because a policy that half-loads is a weaker policy nobody chose: unknown
and missing keys, wrong types, duplicate names, thresholds out of range or out of order, and a
missing required prompt category all raise `PolicyError`, whose message names the file and the
entry ("policies/x.yaml: prompt.categories[2] (self_harm): semantic.review 0.9 > semantic.block 0.8").
The safety stage calls `load_policy` at start-up and stops on the error.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import yaml

from services.safety.decisions import GalleryPolicy, ImageLabelRule, Policy, PromptCategory, Thresholds
from services.safety.normalize import TermMatcher

DEFAULT_POLICY_PATH = Path(__file__).resolve().parent / "policies" / "default.yaml"

REQUIRED_PROMPT_CATEGORIES = ("sexual_minors", "non_consensual_intimate", "graphic_violence",
                              "deceptive_impersonation", "self_harm", "hate")

# nudenet 3.4.2's classes (nudenet/nudenet.py __labels); a test checks this against the package,
# which is not imported here because loading a policy should not load onnxruntime and OpenCV.
NUDENET_LABELS = frozenset({
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
})

_COSINE = (-1.0, 1.0)       # semantic and gallery thresholds: cosine similarities
_PROBABILITY = (0.0, 1.0)   # lexical match score and detector scores


class PolicyError(ValueError):
    """A policy file that does not validate; the message names the file and the entry."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


class _Reader:
    """Typed access to the parsed YAML that raises PolicyError naming the file and entry."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> PolicyError:
        return PolicyError(f"{self.source}: {where}: {message}" if where else f"{self.source}: {message}")

    def mapping(self, value: Any, where: str, required: set[str], optional: frozenset[str] = frozenset()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {type(value).__name__}")
        unknown = sorted(str(key) for key in value if key not in required | optional)
        if unknown:
            raise self.fail(where, f"unknown key(s) {', '.join(unknown)}")
        missing = sorted(required - set(value))
        if missing:
            raise self.fail(where, f"missing key(s) {', '.join(missing)}")
        return value

    def string(self, value: Any, where: str, allow_empty: bool = False) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"expected a string, got {type(value).__name__} {value!r}")
        if not allow_empty and not value.strip():
            raise self.fail(where, "must not be empty")
        return value

    def number(self, value: Any, where: str, bounds: tuple[float, float]) -> float:
        # bool is an int in Python; `review: true` is a mistake, not 1.0.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise self.fail(where, f"expected a number, got {value!r}")
        low, high = bounds
        if not low <= value <= high:
            raise self.fail(where, f"{value} is outside [{low:g}, {high:g}]")
        return float(value)

    def thresholds(self, review: Any, block: Any, where: str, prefix: str, bounds: tuple[float, float],
                   block_may_be_null: bool) -> Thresholds:
        review_value = self.number(review, f"{where}: {prefix}review", bounds)
        if block is None and block_may_be_null:
            return Thresholds(review_value, math.inf)     # no BLOCK band: the score only ever reviews
        block_value = self.number(block, f"{where}: {prefix}block", bounds)
        if review_value > block_value:
            raise self.fail(where, f"{prefix}review {review_value:g} > {prefix}block {block_value:g}")
        return Thresholds(review_value, block_value)

    def strings(self, value: Any, where: str, allow_none: bool) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(where, f"expected a list, got {type(value).__name__}")
        if not value and not allow_none:
            raise self.fail(where, "must not be empty")
        items = tuple(self.string(item, f"{where}[{index}]") for index, item in enumerate(value))
        seen: set[str] = set()
        for index, item in enumerate(items):
            if item in seen:
                raise self.fail(f"{where}[{index}]", f"duplicate entry {item!r}")
            seen.add(item)
        return items

    def entries(self, value: Any, where: str, read: Callable[[Any, str], Any], name_of: Callable[[Any], str],
                kind: str) -> tuple[Any, ...]:
        """A list of mappings read by `read(item, where)`, names unique."""
        if not isinstance(value, list) or not value:
            raise self.fail(where, "expected a non-empty list")
        items = []
        seen: set[str] = set()
        for index, item in enumerate(value):
            label = item.get(kind) if isinstance(item, dict) and isinstance(item.get(kind), str) else ""
            entry_where = f"{where}[{index}]" + (f" ({label})" if label else "")
            parsed = read(item, entry_where)
            if name_of(parsed) in seen:
                raise self.fail(entry_where, f"duplicate {kind} {name_of(parsed)!r}")
            seen.add(name_of(parsed))
            items.append(parsed)
        return tuple(items)


def _prompt_category(reader: _Reader, item: Any, where: str) -> PromptCategory:
    entry = reader.mapping(item, where, {"name", "description", "semantic", "lexical", "terms", "examples"})
    semantic = reader.mapping(entry["semantic"], f"{where}: semantic", {"review", "block"})
    lexical = reader.mapping(entry["lexical"], f"{where}: lexical", {"review", "block"})
    terms = reader.strings(entry["terms"], f"{where}: terms", allow_none=True)
    for index, term in enumerate(terms):
        try:
            TermMatcher([term])
        except ValueError as exc:
            raise reader.fail(f"{where}: terms[{index}]", str(exc)) from None
    return PromptCategory(
        name=reader.string(entry["name"], f"{where}: name"),
        description=reader.string(entry["description"], f"{where}: description"),
        semantic=reader.thresholds(semantic["review"], semantic["block"], where, "semantic.", _COSINE, True),
        examples=reader.strings(entry["examples"], f"{where}: examples", allow_none=False),
        lexical=reader.thresholds(lexical["review"], lexical["block"], where, "lexical.", _PROBABILITY, True),
        terms=terms,
    )


def _image_label(reader: _Reader, item: Any, where: str) -> ImageLabelRule:
    entry = reader.mapping(item, where, {"label", "category", "sexual", "review", "block"})
    label = reader.string(entry["label"], f"{where}: label")
    if label not in NUDENET_LABELS:
        raise reader.fail(where, f"label {label!r} is not a nudenet class ({', '.join(sorted(NUDENET_LABELS))})")
    if not isinstance(entry["sexual"], bool):
        raise reader.fail(f"{where}: sexual", f"expected true or false, got {entry['sexual']!r}")
    return ImageLabelRule(
        label=label,
        category=reader.string(entry["category"], f"{where}: category"),
        thresholds=reader.thresholds(entry["review"], entry["block"], where, "", _PROBABILITY, False),
        sexual=entry["sexual"],
    )


def _gallery(reader: _Reader, item: Any, policy_dir: Path) -> GalleryPolicy:
    if isinstance(item, dict) and ("review" in item or "block" in item):
        # Policy files before 2026.12.3 had one review/block pair for every embedding model.
        raise reader.fail("gallery", "review/block are per embedding model now: write them under "
                                     "gallery.models.<embedding model>, e.g. models: {dlib-resnet-128: "
                                     "{review: 0.93, block: 0.955}, arcface-512: {review: 0.30, block: 0.45}}")
    entry = reader.mapping(item, "gallery", {"path", "models", "category"})
    path = reader.string(entry["path"], "gallery: path", allow_empty=True).strip()
    if path and not Path(path).is_absolute():
        path = str(policy_dir / path)
    models = entry["models"]
    if not isinstance(models, dict) or not models:
        raise reader.fail("gallery: models", "expected a non-empty mapping of embedding model to {review, block}")
    thresholds: dict[str, Thresholds] = {}
    for name, pair in models.items():
        where = f"gallery: models: {name}"
        model = reader.string(name, where).strip()
        band = reader.mapping(pair, where, {"review", "block"})
        thresholds[model] = reader.thresholds(band["review"], band["block"], where, "", _COSINE, False)
    return GalleryPolicy(path=path, models=thresholds,
                         category=reader.string(entry["category"], "gallery: category"))


def parse_policy(document: Any, source: str, policy_dir: Path) -> Policy:
    """A Policy from an already parsed YAML document; `source` names it in errors."""
    reader = _Reader(source)
    top = reader.mapping(document, "", {"version", "minor_age", "prompt", "image", "gallery"},
                         frozenset({"minor_category"}))
    version = reader.string(top["version"], "version")
    minor_age = top["minor_age"]
    if isinstance(minor_age, bool) or not isinstance(minor_age, int) or not 0 <= minor_age <= 150:
        raise reader.fail("minor_age", f"expected a whole number of years in [0, 150], got {minor_age!r}")
    minor_category = reader.string(top.get("minor_category", "sexual_minors"), "minor_category")

    prompt = reader.mapping(top["prompt"], "prompt", {"categories"})
    categories = reader.entries(prompt["categories"], "prompt.categories",
                                lambda item, where: _prompt_category(reader, item, where),
                                lambda category: category.name, "name")
    names = {category.name for category in categories}
    missing = [name for name in REQUIRED_PROMPT_CATEGORIES if name not in names]
    if missing:
        raise reader.fail("prompt.categories", f"required categories missing: {', '.join(missing)}")

    image = reader.mapping(top["image"], "image", {"labels"})
    labels = reader.entries(image["labels"], "image.labels", lambda item, where: _image_label(reader, item, where),
                            lambda rule: rule.label, "label")
    gallery = _gallery(reader, top["gallery"], policy_dir)

    every_category: list[str] = []
    for name in [c.name for c in categories] + [r.category for r in labels] + [gallery.category, minor_category]:
        if name not in every_category:
            every_category.append(name)
    return Policy(version=version, prompt_categories=categories, image_labels=labels, gallery=gallery,
                  minor_age=minor_age, minor_category=minor_category, categories=tuple(every_category))


def load_policy(path: str | Path = DEFAULT_POLICY_PATH) -> Policy:
    """Read and validate a policy file; PolicyError (a ValueError) names the file and the entry,
    OSError when it cannot be read."""
    source = str(path)
    text = Path(path).read_text(encoding="utf-8")
    try:
        document = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from None
    return parse_policy(document, source, Path(path).resolve().parent)
