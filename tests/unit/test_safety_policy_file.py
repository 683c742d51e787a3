"""The policy file loader: the default file loads into the typed Policy, and every kind of invalid
file fails with a PolicyError naming the file and the entry."""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from services.safety.decisions import Outcome, Thresholds
from services.safety.policy import (DEFAULT_POLICY_PATH, NUDENET_LABELS, REQUIRED_PROMPT_CATEGORIES, PolicyError,
                                    load_policy)


@pytest.fixture(scope="module")
def default_document() -> dict[str, Any]:
    return yaml.safe_load(DEFAULT_POLICY_PATH.read_text(encoding="utf-8"))


def write_policy(tmp_path: Path, document: Any, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def test_default_policy_loads() -> None:
    policy = load_policy(DEFAULT_POLICY_PATH)
    assert policy.version == "2026.12.3" and policy.minor_age == 18 and policy.minor_category == "sexual_minors"
    names = [category.name for category in policy.prompt_categories]
    assert set(REQUIRED_PROMPT_CATEGORIES) <= set(names)
    assert all(8 <= len(category.examples) <= 20 for category in policy.prompt_categories)
    genitals = next(rule for rule in policy.image_labels if rule.label == "FEMALE_GENITALIA_EXPOSED")
    assert genitals.sexual and genitals.thresholds == Thresholds(0.45, 0.7)
    breasts = next(rule for rule in policy.image_labels if rule.label == "FEMALE_BREAST_EXPOSED")
    assert breasts.thresholds == Thresholds(0.5, 0.8)
    assert policy.gallery.path == "" and policy.gallery.models == {
        "dlib-resnet-128": Thresholds(0.93, 0.955), "arcface-512": Thresholds(0.30, 0.45)}
    assert policy.gallery.category == "protected_identity"
    assert {"protected_identity", "sexual_explicit", *REQUIRED_PROMPT_CATEGORIES} <= set(policy.categories)


def test_null_block_means_review_only() -> None:
    violence = load_policy(DEFAULT_POLICY_PATH).prompt_category("graphic_violence")
    assert violence.lexical.block == math.inf
    assert violence.lexical.outcome(1.0) == (Outcome.REVIEW, 1.0)


def test_label_names_are_nudenets() -> None:
    nudenet_module = pytest.importorskip("nudenet.nudenet")
    assert NUDENET_LABELS == set(vars(nudenet_module)["__labels"])
    assert {rule.label for rule in load_policy(DEFAULT_POLICY_PATH).image_labels} <= NUDENET_LABELS


def _category(name: str) -> Callable[[dict], dict]:
    return lambda doc: next(c for c in doc["prompt"]["categories"] if c["name"] == name)


def _set_version_int(doc: dict) -> None:
    doc["version"] = 2026


def _unknown_category_key(doc: dict) -> None:
    _category("hate")(doc)["examples_extra"] = ["x"]


def _missing_examples(doc: dict) -> None:
    del _category("self_harm")(doc)["examples"]


def _empty_examples(doc: dict) -> None:
    _category("hate")(doc)["examples"] = []


def _duplicate_name(doc: dict) -> None:
    doc["prompt"]["categories"][6]["name"] = "hate"


def _semantic_out_of_range(doc: dict) -> None:
    _category("hate")(doc)["semantic"]["review"] = -1.5


def _lexical_out_of_range(doc: dict) -> None:
    _category("hate")(doc)["lexical"]["review"] = 1.2


def _missing_required(doc: dict) -> None:
    doc["prompt"]["categories"] = [c for c in doc["prompt"]["categories"] if c["name"] != "self_harm"]


def _unknown_label(doc: dict) -> None:
    doc["image"]["labels"][1]["label"] = "GENITALIA_EXPOSED"


def _duplicate_label(doc: dict) -> None:
    doc["image"]["labels"][1]["label"] = doc["image"]["labels"][0]["label"]


def _label_review_above_block(doc: dict) -> None:
    doc["image"]["labels"][0]["review"] = 0.9


def _sexual_not_bool(doc: dict) -> None:
    doc["image"]["labels"][0]["sexual"] = "yes"


def _bool_threshold(doc: dict) -> None:
    doc["gallery"]["models"]["dlib-resnet-128"]["block"] = True


def _one_gallery_pair_for_every_model(doc: dict) -> None:
    doc["gallery"]["review"], doc["gallery"]["block"] = 0.5, 0.65   # the pre-2026.12.3 shape


def _no_gallery_models(doc: dict) -> None:
    doc["gallery"]["models"] = {}


def _gallery_model_review_above_block(doc: dict) -> None:
    doc["gallery"]["models"]["arcface-512"] = {"review": 0.5, "block": 0.4}


def _gallery_model_extra_key(doc: dict) -> None:
    doc["gallery"]["models"]["arcface-512"]["warn"] = 0.2


def _missing_gallery_key(doc: dict) -> None:
    del doc["gallery"]["category"]


def _unknown_top_key(doc: dict) -> None:
    doc["minor_ages"] = 18


def _minor_age_negative(doc: dict) -> None:
    doc["minor_age"] = -1


def _term_of_punctuation(doc: dict) -> None:
    _category("hate")(doc)["terms"].insert(0, "!!! & ...")


def _empty_term_list_item(doc: dict) -> None:
    _category("hate")(doc)["terms"].insert(0, "")


@pytest.mark.parametrize("mutate, message", [
    (_set_version_int, "x.yaml: version: expected a string, got int 2026"),
    (_unknown_category_key, "x.yaml: prompt.categories[5] (hate): unknown key(s) examples_extra"),
    (_missing_examples, "x.yaml: prompt.categories[4] (self_harm): missing key(s) examples"),
    (_empty_examples, "x.yaml: prompt.categories[5] (hate): examples: must not be empty"),
    (_duplicate_name, "x.yaml: prompt.categories[6] (hate): duplicate name 'hate'"),
    (_semantic_out_of_range, "x.yaml: prompt.categories[5] (hate): semantic.review: -1.5 is outside [-1, 1]"),
    (_lexical_out_of_range, "x.yaml: prompt.categories[5] (hate): lexical.review: 1.2 is outside [0, 1]"),
    (_missing_required, "x.yaml: prompt.categories: required categories missing: self_harm"),
    (_unknown_label, "x.yaml: image.labels[1] (GENITALIA_EXPOSED): label 'GENITALIA_EXPOSED' is not a nudenet class"),
    (_duplicate_label,
     "x.yaml: image.labels[1] (FEMALE_GENITALIA_EXPOSED): duplicate label 'FEMALE_GENITALIA_EXPOSED'"),
    (_label_review_above_block, "x.yaml: image.labels[0] (FEMALE_GENITALIA_EXPOSED): review 0.9 > block 0.7"),
    (_sexual_not_bool, "x.yaml: image.labels[0] (FEMALE_GENITALIA_EXPOSED): sexual: expected true or false, got 'yes'"),
    (_bool_threshold, "x.yaml: gallery: models: dlib-resnet-128: block: expected a number, got True"),
    (_one_gallery_pair_for_every_model, "x.yaml: gallery: review/block are per embedding model now: write them "
                                        "under gallery.models.<embedding model>"),
    (_no_gallery_models, "x.yaml: gallery: models: expected a non-empty mapping of embedding model to "
                         "{review, block}"),
    (_gallery_model_review_above_block, "x.yaml: gallery: models: arcface-512: review 0.5 > block 0.4"),
    (_gallery_model_extra_key, "x.yaml: gallery: models: arcface-512: unknown key(s) warn"),
    (_missing_gallery_key, "x.yaml: gallery: missing key(s) category"),
    (_unknown_top_key, "x.yaml: unknown key(s) minor_ages"),
    (_minor_age_negative, "x.yaml: minor_age: expected a whole number of years in [0, 150], got -1"),
    (_term_of_punctuation, "x.yaml: prompt.categories[5] (hate): terms[0]: term part '!!!' normalises to nothing"),
    (_empty_term_list_item, "x.yaml: prompt.categories[5] (hate): terms[0]: must not be empty"),
])
def test_invalid_policy_names_file_and_entry(tmp_path: Path, default_document: dict, mutate: Callable[[dict], None],
                                             message: str) -> None:
    document = copy.deepcopy(default_document)
    mutate(document)
    path = write_policy(tmp_path, document)
    with pytest.raises(PolicyError, match=r"^" + re.escape(str(path) + message.removeprefix("x.yaml"))):
        load_policy(path)


def test_semantic_review_above_block_reads_like_the_stage_reports_it(tmp_path: Path, default_document: dict) -> None:
    document = copy.deepcopy(default_document)
    document["prompt"]["categories"][2]["semantic"] = {"review": 0.9, "block": 0.8}
    path = write_policy(tmp_path, document)
    with pytest.raises(PolicyError) as error:
        load_policy(path)
    assert str(error.value) == (f"{path}: prompt.categories[2] (graphic_violence): "
                                "semantic.review 0.9 > semantic.block 0.8")
    assert isinstance(error.value, ValueError)


def test_semantic_thresholds_may_be_negative(tmp_path: Path, default_document: dict) -> None:
    document = copy.deepcopy(default_document)
    document["prompt"]["categories"][5]["semantic"] = {"review": -0.2, "block": 0.1}
    assert load_policy(write_policy(tmp_path, document)).prompt_category("hate").semantic == Thresholds(-0.2, 0.1)


def test_duplicate_yaml_key_is_rejected(tmp_path: Path) -> None:
    text = DEFAULT_POLICY_PATH.read_text(encoding="utf-8").replace('version: "2026.12.3"',
                                                                    'version: "2026.12.3"\nversion: "2026.12.4"')
    path = tmp_path / "dup.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PolicyError, match=re.escape(f"{path}: not valid YAML") + r".*duplicate key 'version'"):
        load_policy(path)


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: [unclosed\n", encoding="utf-8")
    with pytest.raises(PolicyError, match=re.escape(f"{broken}: not valid YAML")):
        load_policy(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(PolicyError, match=re.escape(f"{listing}: expected a mapping, got list")):
        load_policy(listing)


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_policy(tmp_path / "absent.yaml")


def test_gallery_path_is_relative_to_the_policy_file(tmp_path: Path, default_document: dict) -> None:
    document = copy.deepcopy(default_document)
    document["gallery"]["path"] = "galleries/people.npz"
    (tmp_path / "conf").mkdir()
    policy = load_policy(write_policy(tmp_path / "conf", document))
    assert policy.gallery.path == str((tmp_path / "conf" / "galleries" / "people.npz").resolve())
