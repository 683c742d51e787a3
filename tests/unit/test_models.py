"""Tokenizer derivation, the tiny model builder and the model registry."""

from __future__ import annotations

import hashlib
import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffmesh.models import clip_vocab
from diffmesh.models.clip_vocab import ClipVocabError, write_clip_tokenizer
from diffmesh.models.pool import ModelPool
from diffmesh.models.registry import (
    Kind,
    ModelEntry,
    ModelError,
    ModelFamily,
    Registry,
    RegistryItem,
    UnknownModelError,
    detect_family,
    write_registry,
)
from diffmesh.models.tiny import SD15_ID, SDXL_ID, build_tiny_models

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


def _hashes(root: Path, pattern: str) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob(pattern))
    }


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_models(root)
    return root


@pytest.fixture(scope="module")
def pipelines(tiny_root: Path) -> dict[str, object]:
    from diffusers import DiffusionPipeline

    pipes = {}
    for model_id in (SD15_ID, SDXL_ID):
        pipe = DiffusionPipeline.from_pretrained(tiny_root / model_id, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        pipes[model_id] = pipe
    return pipes


def _generate(pipe: object, prompt: str, size: int = 64, steps: int = 2) -> np.ndarray:
    image = pipe(  # type: ignore[operator]
        prompt,
        height=size,
        width=size,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    return np.asarray(image).astype(np.int16)


# --- tokenizer ---------------------------------------------------------------------------------


def test_clip_tokenizer_matches_real_ids(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    write_clip_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok("a photo of a cat").input_ids == CAT_IDS
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    # Over-long prompts must be cut at 77 with EOS last, as the text encoder's positions demand.
    long_ids = tok("cat " * 200, truncation=True).input_ids
    assert len(long_ids) == 77 and long_ids[-1] == 49407


def test_clip_tokenizer_pad_token(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    write_clip_tokenizer(tmp_path, pad_token="!")
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    ids = tok("a photo of a cat", padding="max_length", max_length=10).input_ids
    assert ids == CAT_IDS + [0, 0, 0]  # "!" is id 0: SDXL tokenizer_2's padding


def test_clip_vocab_missing_package_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "open_clip" else real_find_spec(name, *a),
    )
    with pytest.raises(ClipVocabError, match="open_clip_torch is not installed"):
        clip_vocab.find_bpe_vocab()


# --- tiny builder ------------------------------------------------------------------------------


def test_build_is_bit_identical(tiny_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected_draw = torch.rand(3)
    torch.manual_seed(1234)
    start = time.perf_counter()
    build_tiny_models(tmp_path)
    elapsed = time.perf_counter() - start
    # The builder seeds per component but must leave the caller's RNG stream where it was.
    assert torch.equal(torch.rand(3), expected_draw)

    first = _hashes(tiny_root, "*.safetensors")
    second = _hashes(tmp_path, "*.safetensors")
    assert len(first) == 7  # sd15: te, unet, vae; sdxl: te, te2, unet, vae
    assert first == second
    # Configs and tokenizer files too: a rebuild must not churn anything a cache keys on.
    assert _hashes(tiny_root, "*.json") == _hashes(tmp_path, "*.json")
    assert _hashes(tiny_root, "*.txt") == _hashes(tmp_path, "*.txt")
    assert elapsed < 30, f"tiny build took {elapsed:.1f}s"


def test_build_sizes_and_layout(tiny_root: Path) -> None:
    sizes = {
        model_id: sum(p.stat().st_size for p in (tiny_root / model_id).rglob("*") if p.is_file())
        for model_id in (SD15_ID, SDXL_ID)
    }
    assert sizes[SD15_ID] < 16 * 2**20
    assert sizes[SDXL_ID] < 24 * 2**20
    for sub in ("tokenizer", "tokenizer_2"):
        assert (tiny_root / SDXL_ID / sub / "vocab.json").is_file()
    assert not (tiny_root / SD15_ID / "safety_checker").exists()


def test_pipelines_load_with_right_family_and_config(
    tiny_root: Path, pipelines: dict[str, object]
) -> None:
    sd, xl = pipelines[SD15_ID], pipelines[SDXL_ID]
    assert type(sd).__name__ == "StableDiffusionPipeline"
    assert type(xl).__name__ == "StableDiffusionXLPipeline"
    assert detect_family(tiny_root / SD15_ID) is ModelFamily.SD15
    assert detect_family(tiny_root / SDXL_ID) is ModelFamily.SDXL

    assert sd.vae_scale_factor == 8 and xl.vae_scale_factor == 8  # type: ignore[attr-defined]
    assert sd.vae.config.scaling_factor == pytest.approx(0.18215)  # type: ignore[attr-defined]
    assert xl.vae.config.scaling_factor == pytest.approx(0.13025)  # type: ignore[attr-defined]
    assert type(sd.scheduler).__name__ == "PNDMScheduler"  # type: ignore[attr-defined]
    assert sd.scheduler.config.skip_prk_steps is True  # type: ignore[attr-defined]
    assert sd.scheduler.config.steps_offset == 1  # type: ignore[attr-defined]
    assert type(xl.scheduler).__name__ == "EulerDiscreteScheduler"  # type: ignore[attr-defined]
    assert xl.scheduler.config.timestep_spacing == "leading"  # type: ignore[attr-defined]
    assert xl.config.force_zeros_for_empty_prompt is True  # type: ignore[attr-defined]
    assert xl.tokenizer_2.pad_token == "!"  # type: ignore[attr-defined]
    assert xl.tokenizer("a photo of a cat").input_ids == CAT_IDS  # type: ignore[attr-defined]
    assert sd.tokenizer("a photo of a cat").input_ids == CAT_IDS  # type: ignore[attr-defined]


@pytest.mark.parametrize("model_id", [SD15_ID, SDXL_ID])
def test_pipelines_generate_varied_images(pipelines: dict[str, object], model_id: str) -> None:
    cat = _generate(pipelines[model_id], "a photo of a cat")
    assert cat.shape == (64, 64, 3)
    assert cat.std() > 10, "image is flat: random weights give no texture"
    # Prompts must reach the pixels, or tests of prompt routing through the mesh prove nothing.
    dog = _generate(pipelines[model_id], "a photo of a dog")
    assert (np.abs(cat - dog) > 1).mean() > 0.4  # ~0.8 measured; ~0.1 with default init


def test_registry_written_by_builder(tiny_root: Path) -> None:
    registry = Registry.load(tiny_root / "registry.yaml")
    assert registry.ids(kinds=("pipeline",)) == [SD15_ID, SDXL_ID]
    # the face stage's embedded default (dlib, real weights), the tiny insightface pack and a tiny
    # PhotoMaker V2 identity encoder for each one's embedding size, on tiny-sdxl
    assert registry.ids(kinds=("face_analysis",)) == ["faces", "faces-tiny-arcface"]
    assert registry.ids(kinds=("identity_encoder",)) == ["photomaker-tiny", "photomaker-tiny-arcface"]
    assert {registry.specs[i].base for i in registry.ids(kinds=("identity_encoder",))} == {SDXL_ID}
    registry.verify()
    entry = registry.get(SDXL_ID)
    assert entry.path == tiny_root.resolve() / SDXL_ID
    assert entry.family is ModelFamily.SDXL
    assert entry.component_dir("text_encoder_2") == entry.path / "text_encoder_2"
    # Relative paths in the file keep the tree relocatable.
    raw = yaml.safe_load((tiny_root / "registry.yaml").read_text())
    assert raw["models"][SD15_ID] == {"path": SD15_ID}


# --- registry ----------------------------------------------------------------------------------


def _fake_model(path: Path, class_name: str = "StableDiffusionPipeline") -> Path:
    path.mkdir(parents=True)
    (path / "model_index.json").write_text(f'{{"_class_name": "{class_name}"}}')
    return path


def test_registry_relative_and_absolute_paths(tmp_path: Path) -> None:
    _fake_model(tmp_path / "reg" / "models" / "a")
    b = _fake_model(tmp_path / "elsewhere" / "b", "StableDiffusionXLImg2ImgPipeline")
    reg_file = tmp_path / "reg" / "registry.yaml"
    reg_file.write_text(f"models:\n  a: {{path: models/a}}\n  b: {{path: {b}}}\n")
    registry = Registry.load(reg_file)
    assert registry.get("a").path == (tmp_path / "reg" / "models" / "a").resolve()
    assert registry.get("a").family is ModelFamily.SD15
    assert registry.get("b").path == b
    assert registry.get("b").family is ModelFamily.SDXL
    assert [e.id for e in registry.entries()] == ["a", "b"]


def test_registry_missing_dir_loads_but_get_names_path(tmp_path: Path) -> None:
    reg_file = tmp_path / "registry.yaml"
    reg_file.write_text("models:\n  gone: {path: not-there}\n")
    registry = Registry.load(reg_file)  # listing must still work
    assert registry.ids() == ["gone"]
    missing = str(tmp_path.resolve() / "not-there")
    with pytest.raises(ModelError, match="not-there") as exc_info:
        registry.get("gone")
    assert missing in str(exc_info.value)
    with pytest.raises(ModelError) as exc_info:
        registry.verify()
    assert missing in str(exc_info.value)


def test_registry_dir_without_model_index(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    reg_file = tmp_path / "registry.yaml"
    reg_file.write_text("models:\n  e: {path: empty}\n")
    with pytest.raises(ModelError) as exc_info:
        Registry.load(reg_file).verify()
    assert str(tmp_path.resolve() / "empty" / "model_index.json") in str(exc_info.value)


def test_registry_unsupported_class_names_path_and_class(tmp_path: Path) -> None:
    model = _fake_model(tmp_path / "flux", "FluxPipeline")
    with pytest.raises(ModelError) as exc_info:
        detect_family(model)
    assert "FluxPipeline" in str(exc_info.value) and str(model) in str(exc_info.value)


def test_registry_unknown_id_lists_known(tmp_path: Path) -> None:
    reg_file = tmp_path / "registry.yaml"
    reg_file.write_text("models:\n  one: {path: a}\n  two: {path: b}\n")
    registry = Registry.load(reg_file)
    with pytest.raises(UnknownModelError) as exc_info:
        registry.get("three")
    message = str(exc_info.value)
    assert "'three'" in message and "one, two" in message
    assert isinstance(exc_info.value, KeyError) and isinstance(exc_info.value, ModelError)


def test_component_dir_missing_names_path(tmp_path: Path) -> None:
    _fake_model(tmp_path / "m")
    reg_file = tmp_path / "registry.yaml"
    reg_file.write_text("models:\n  m: {path: m}\n")
    entry = Registry.load(reg_file).get("m")
    with pytest.raises(ModelError) as exc_info:
        entry.component_dir("unet")
    assert str(entry.path / "unet") in str(exc_info.value)


@pytest.mark.parametrize(
    "text",
    [
        "models: [unclosed\n",  # malformed YAML
        "",  # empty
        "- a\n- b\n",  # not a mapping
        "models:\n  x: just-a-string\n",  # entry without path
        "models:\n  x: {path: 3}\n",  # path not a string
    ],
)
def test_registry_bad_file_names_file(tmp_path: Path, text: str) -> None:
    reg_file = tmp_path / "bad-registry.yaml"
    reg_file.write_text(text)
    with pytest.raises(ModelError) as exc_info:
        Registry.load(reg_file)
    assert str(reg_file) in str(exc_info.value)


def test_registry_missing_file_names_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as exc_info:
        Registry.load(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(exc_info.value)


def test_write_registry_merges(tmp_path: Path) -> None:
    reg_file = tmp_path / "registry.yaml"
    reg_file.write_text("models:\n  prod: {path: /mnt/models/sdxl}\n  old: {path: old-dir}\n")
    write_registry(reg_file, {"old": tmp_path / "new-dir", "extra": "rel/dir"})
    registry = Registry.load(reg_file)
    assert registry.ids() == ["extra", "old", "prod"]
    assert registry.path_of("prod") == Path("/mnt/models/sdxl")
    assert registry.path_of("old") == tmp_path.resolve() / "new-dir"  # replaced
    assert registry.path_of("extra") == tmp_path.resolve() / "rel" / "dir"
    raw = yaml.safe_load(reg_file.read_text())
    assert raw["models"]["old"] == {"path": "new-dir"}  # under the registry folder: relative


def test_write_registry_refuses_to_clobber_bad_file(tmp_path: Path) -> None:
    reg_file = tmp_path / "registry.yaml"
    reg_file.write_text("models: [unclosed\n")
    with pytest.raises(ModelError, match="malformed"):
        write_registry(reg_file, {"x": "x"})
    assert reg_file.read_text() == "models: [unclosed\n"


# --- registry kinds ----------------------------------------------------------------------------


def _kinds_registry(tmp_path: Path, extra: str = "", face_path: str = "faces") -> Path:
    """A pipeline, one entry of every other kind (existing paths unless ``face_path`` says
    otherwise) and ``extra`` lines."""
    _fake_model(tmp_path / "sd", "StableDiffusionPipeline")
    (tmp_path / "faces").mkdir(exist_ok=True)
    for name in ("photomaker.bin", "pixel.safetensors", "canny.safetensors", "ipa.bin", "policy.yaml"):
        (tmp_path / name).write_bytes(b"x")
    reg_file = tmp_path / "registry.yaml"
    reg_file.write_text(
        "models:\n"
        "  sd: {path: sd}\n"
        f"  faces: {{path: {face_path}, kind: face_analysis}}\n"
        "  photomaker: {path: photomaker.bin, kind: identity_encoder, base: sd}\n"
        "  pixel: {path: pixel.safetensors, kind: lora, base: sd}\n"
        "  canny: {path: canny.safetensors, kind: controlnet, base: sd}\n"
        "  ipa: {path: ipa.bin, kind: ip_adapter, base: sd}\n"
        "  policy: {path: policy.yaml, kind: safety_policy}\n" + extra
    )
    return reg_file


def _load_error(tmp_path: Path, text: str) -> str:
    _fake_model(tmp_path / "sd")
    (tmp_path / "x.bin").write_bytes(b"x")
    reg_file = tmp_path / "registry.yaml"
    reg_file.write_text(text)
    with pytest.raises(ModelError) as exc_info:
        Registry.load(reg_file)
    assert str(reg_file) in str(exc_info.value)
    return str(exc_info.value)


def test_kind_defaults_to_pipeline_and_explicit_pipeline_is_the_same(tmp_path: Path) -> None:
    _fake_model(tmp_path / "a")
    _fake_model(tmp_path / "b", "StableDiffusionXLPipeline")
    reg_file = tmp_path / "registry.yaml"
    reg_file.write_text("models:\n  a: {path: a}\n  b: {path: b, kind: pipeline}\n")
    registry = Registry.load(reg_file)
    a, b = registry.get("a"), registry.get("b")
    assert (a.kind, a.base, a.family) == (Kind.PIPELINE, None, ModelFamily.SD15)
    assert (b.kind, b.base, b.family) == (Kind.PIPELINE, None, ModelFamily.SDXL)
    assert registry.kind_of("a") is Kind.PIPELINE


def test_kind_is_a_str_enum_with_every_kind() -> None:
    assert [k.value for k in Kind] == ["pipeline", "face_analysis", "identity_encoder", "lora",
                                       "controlnet", "ip_adapter", "safety_policy"]
    assert Kind.LORA == "lora"  # a str enum: compares equal to the registry file's spelling


def test_every_kind_parses_with_family_only_for_pipelines(tmp_path: Path) -> None:
    registry = Registry.load(_kinds_registry(tmp_path))
    entries = {entry.id: entry for entry in registry.entries()}
    root = tmp_path.resolve()
    assert {i: (e.kind, e.base, e.family, e.path) for i, e in entries.items()} == {
        "sd": (Kind.PIPELINE, None, ModelFamily.SD15, root / "sd"),
        "faces": (Kind.FACE_ANALYSIS, None, None, root / "faces"),
        "photomaker": (Kind.IDENTITY_ENCODER, "sd", None, root / "photomaker.bin"),
        "pixel": (Kind.LORA, "sd", None, root / "pixel.safetensors"),
        "canny": (Kind.CONTROLNET, "sd", None, root / "canny.safetensors"),
        "ipa": (Kind.IP_ADAPTER, "sd", None, root / "ipa.bin"),
        "policy": (Kind.SAFETY_POLICY, None, None, root / "policy.yaml"),
    }
    registry.verify()  # files and folders without model_index.json are fine for non-pipelines


def test_unknown_kind_names_entry_value_and_known_kinds(tmp_path: Path) -> None:
    message = _load_error(tmp_path, "models:\n  sd: {path: sd}\n  vae-x: {path: x.bin, kind: vae}\n")
    assert "'vae-x'" in message and "'vae'" in message
    assert all(kind.value in message for kind in Kind)


def test_unknown_key_in_entry_is_an_error(tmp_path: Path) -> None:
    message = _load_error(tmp_path, "models:\n  sd: {path: sd, famliy: sd15}\n")
    assert "'sd'" in message and "famliy" in message


@pytest.mark.parametrize("kind", ["lora", "controlnet", "ip_adapter"])
def test_adapter_without_base_is_an_error(tmp_path: Path, kind: str) -> None:
    message = _load_error(tmp_path, f"models:\n  sd: {{path: sd}}\n  ad: {{path: x.bin, kind: {kind}}}\n")
    assert "'ad'" in message and "base" in message


@pytest.mark.parametrize(
    "base, why",
    [("nope", "not in the registry"), ("faces", "face_analysis"), ("other", "lora")],
)
def test_adapter_base_must_be_a_pipeline_id(tmp_path: Path, base: str, why: str) -> None:
    (tmp_path / "faces").mkdir()
    message = _load_error(
        tmp_path,
        "models:\n  sd: {path: sd}\n  faces: {path: faces, kind: face_analysis}\n"
        "  other: {path: x.bin, kind: lora, base: sd}\n"
        f"  ad: {{path: x.bin, kind: lora, base: {base}}}\n",
    )
    assert "'ad'" in message and repr(base) in message and why in message
    assert message.endswith("it must be a pipeline id: sd")  # the valid choices


@pytest.mark.parametrize("kind", ["pipeline", "face_analysis", "safety_policy"])
def test_base_on_a_non_adapter_kind_is_an_error(tmp_path: Path, kind: str) -> None:
    message = _load_error(tmp_path, f"models:\n  sd: {{path: sd}}\n  y: {{path: x.bin, kind: {kind}, base: sd}}\n")
    assert "'y'" in message and "base" in message and kind in message


@pytest.mark.parametrize("kind", ["face_analysis", "identity_encoder", "lora", "safety_policy"])
def test_non_pipeline_missing_path_names_path(tmp_path: Path, kind: str) -> None:
    _fake_model(tmp_path / "sd")
    base = ", base: sd" if kind in ("lora", "identity_encoder") else ""
    reg_file = tmp_path / "registry.yaml"
    reg_file.write_text(f"models:\n  sd: {{path: sd}}\n  m: {{path: gone.bin, kind: {kind}{base}}}\n")
    registry = Registry.load(reg_file)  # listing must still work
    missing = str(tmp_path.resolve() / "gone.bin")
    with pytest.raises(ModelError) as exc_info:
        registry.get("m")
    assert missing in str(exc_info.value) and "'m'" in str(exc_info.value)
    with pytest.raises(ModelError) as exc_info:
        registry.verify()
    assert missing in str(exc_info.value)


def test_pipeline_kind_still_needs_a_diffusers_directory(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    reg_file = tmp_path / "registry.yaml"
    reg_file.write_text("models:\n  p: {path: weights.bin, kind: pipeline}\n")
    with pytest.raises(ModelError, match="directory") as exc_info:
        Registry.load(reg_file).get("p")
    assert str(tmp_path.resolve() / "weights.bin") in str(exc_info.value)


def test_selection_by_kind_checks_only_the_selected(tmp_path: Path) -> None:
    registry = Registry.load(_kinds_registry(tmp_path, face_path="unmounted/antelopev2"))
    assert registry.ids() == ["canny", "faces", "ipa", "photomaker", "pixel", "policy", "sd"]
    assert registry.ids(kinds=("pipeline",)) == ["sd"]
    assert registry.ids(kinds="lora") == ["pixel"]  # one kind given bare
    assert registry.ids(kinds=(Kind.LORA, "controlnet")) == ["canny", "pixel"]
    assert registry.ids(kinds=()) == []
    # The missing face pack does not concern a pipeline stage ...
    registry.verify(kinds=("pipeline",))
    registry.verify(kinds=("lora", "identity_encoder"))
    assert [e.id for e in registry.entries(kinds=("pipeline",))] == ["sd"]
    # ... but does stop anything that checks it.
    missing = str(tmp_path.resolve() / "unmounted" / "antelopev2")
    for kinds in (None, ("face_analysis",)):
        with pytest.raises(ModelError) as exc_info:
            registry.verify(kinds=kinds)
        assert missing in str(exc_info.value)
    with pytest.raises(ModelError, match="unmounted"):
        registry.entries()


def test_selection_with_an_unknown_kind_is_an_error(tmp_path: Path) -> None:
    registry = Registry.load(_kinds_registry(tmp_path))
    with pytest.raises(ModelError) as exc_info:
        registry.ids(kinds=("pipelines",))
    assert "'pipelines'" in str(exc_info.value) and "face_analysis" in str(exc_info.value)


# --- model pool --------------------------------------------------------------------------------


def _recording_factory(seen: list[ModelEntry]):
    def factory(entry: ModelEntry) -> str:
        seen.append(entry)
        return f"loaded:{entry.id}"
    return factory


def test_pool_default_kinds_load_only_pipelines(tmp_path: Path) -> None:
    # The call diffmesh.runtime.stage made before kinds existed: it must keep loading pipelines
    # and must not trip over the unmounted face pack.
    reg_file = _kinds_registry(tmp_path, face_path="unmounted")
    seen: list[ModelEntry] = []
    pool: ModelPool[str] = ModelPool()
    pool.load(reg_file, [], _recording_factory(seen))
    assert pool.ids() == ["sd"]
    assert pool.get("sd") == "loaded:sd"
    assert [(e.id, e.family) for e in seen] == [("sd", ModelFamily.SD15)]


def test_pool_loads_every_entry_of_the_given_kinds(tmp_path: Path) -> None:
    reg_file = _kinds_registry(tmp_path)
    seen: list[ModelEntry] = []
    pool: ModelPool[str] = ModelPool()
    pool.load(reg_file, [], _recording_factory(seen), kinds=("face_analysis", "identity_encoder"))
    assert pool.ids() == ["faces", "photomaker"]
    assert {e.kind for e in seen} == {Kind.FACE_ANALYSIS, Kind.IDENTITY_ENCODER}


def test_pool_loading_no_kinds_loads_nothing(tmp_path: Path) -> None:
    pool: ModelPool[str] = ModelPool()
    pool.load(_kinds_registry(tmp_path), [], _recording_factory([]), kinds=())
    assert pool.ids() == []


def test_pool_refuses_an_explicit_id_of_another_kind_before_loading_any(tmp_path: Path) -> None:
    reg_file = _kinds_registry(tmp_path)
    seen: list[ModelEntry] = []
    with pytest.raises(ModelError) as exc_info:
        ModelPool().load(reg_file, ["sd", "faces"], _recording_factory(seen), kinds=("pipeline",))
    message = str(exc_info.value)
    assert "'faces'" in message and "does not load face_analysis" in message and "pipeline" in message
    assert seen == []  # checked before the (slow) loads start


def test_pool_explicit_ids_of_the_right_kind(tmp_path: Path) -> None:
    reg_file = _kinds_registry(tmp_path, face_path="unmounted")
    pool: ModelPool[str] = ModelPool()
    pool.load(reg_file, ["pixel"], _recording_factory([]), kinds=("lora",))
    assert pool.ids() == ["pixel"]
    with pytest.raises(UnknownModelError, match="'nope'"):
        ModelPool().load(reg_file, ["nope"], _recording_factory([]))


def test_pool_selected_missing_path_is_a_load_error_naming_it(tmp_path: Path) -> None:
    reg_file = _kinds_registry(tmp_path, face_path="unmounted")
    with pytest.raises(ModelError) as exc_info:
        ModelPool().load(reg_file, [], _recording_factory([]), kinds=("face_analysis",))
    assert str(tmp_path.resolve() / "unmounted") in str(exc_info.value)


# --- write_registry with kinds, catalog, CLI -------------------------------------------------------


def test_write_registry_keeps_other_entries_kind_and_base(tmp_path: Path) -> None:
    reg_file = _kinds_registry(tmp_path)
    before = yaml.safe_load(reg_file.read_text())["models"]
    _fake_model(tmp_path / "sd2")
    write_registry(reg_file, {"sd2": tmp_path / "sd2"})
    after = yaml.safe_load(reg_file.read_text())["models"]
    assert after == {**before, "sd2": {"path": "sd2"}}
    registry = Registry.load(reg_file)
    assert registry.get("pixel").kind is Kind.LORA and registry.get("pixel").base == "sd"
    assert registry.kind_of("faces") is Kind.FACE_ANALYSIS


def test_write_registry_items_with_kind_and_base(tmp_path: Path) -> None:
    reg_file = tmp_path / "registry.yaml"
    _fake_model(tmp_path / "sd")
    (tmp_path / "pixel.safetensors").write_bytes(b"x")
    write_registry(reg_file, {
        "sd": RegistryItem(tmp_path / "sd"),
        "pixel": RegistryItem(tmp_path / "pixel.safetensors", kind="lora", base="sd"),
        "faces": RegistryItem("/mnt/faces", kind=Kind.FACE_ANALYSIS),
    })
    assert yaml.safe_load(reg_file.read_text())["models"] == {
        "faces": {"path": "/mnt/faces", "kind": "face_analysis"},
        "pixel": {"path": "pixel.safetensors", "kind": "lora", "base": "sd"},
        "sd": {"path": "sd"},  # the default kind is not written: old readers see the old format
    }
    assert Registry.load(reg_file).get("pixel").base == "sd"


def test_write_registry_refuses_a_merge_that_would_not_load(tmp_path: Path) -> None:
    reg_file = _kinds_registry(tmp_path)
    before = reg_file.read_text()
    with pytest.raises(ModelError, match="'nope'"):
        write_registry(reg_file, {"bad": RegistryItem("x.bin", kind="lora", base="nope")})
    with pytest.raises(ModelError, match="'vae'"):
        write_registry(reg_file, {"bad": RegistryItem("x.bin", kind="vae")})
    # Replacing the adapters' base with a non-pipeline would orphan them.
    with pytest.raises(ModelError, match="base 'sd' is a face_analysis entry"):
        write_registry(reg_file, {"sd": RegistryItem("faces", kind="face_analysis")})
    assert reg_file.read_text() == before


def test_catalog_reads_only_pipelines(tiny_root: Path, tmp_path: Path) -> None:
    from services.orchestrator.plan import ModelCatalog

    reg_file = tmp_path / "registry.yaml"
    (tmp_path / "pixel.safetensors").write_bytes(b"x")
    reg_file.write_text(
        "models:\n"
        f"  {SD15_ID}: {{path: {tiny_root / SD15_ID}}}\n"
        f"  {SDXL_ID}: {{path: {tiny_root / SDXL_ID}, kind: pipeline}}\n"
        "  faces: {path: not-mounted, kind: face_analysis}\n"  # missing: must not matter here
        f"  pixel: {{path: pixel.safetensors, kind: lora, base: {SDXL_ID}}}\n"
        "  policy: {path: policy.yaml, kind: safety_policy}\n"  # missing too
    )
    catalog = ModelCatalog.load(reg_file)
    assert catalog.ids() == [SD15_ID, SDXL_ID]
    assert catalog.get("pixel") is None and catalog.get("faces") is None


def test_models_list_prints_id_kind_base_and_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from diffmesh.cli.main import main

    reg_file = _kinds_registry(tmp_path, face_path="unmounted")  # listing never checks disk
    assert main(["models", "list", "--registry", str(reg_file)]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    root = tmp_path.resolve()
    assert rows == [
        ["canny", "controlnet", "sd", str(root / "canny.safetensors")],
        ["faces", "face_analysis", str(root / "unmounted")],
        ["ipa", "ip_adapter", "sd", str(root / "ipa.bin")],
        ["photomaker", "identity_encoder", "sd", str(root / "photomaker.bin")],
        ["pixel", "lora", "sd", str(root / "pixel.safetensors")],
        ["policy", "safety_policy", str(root / "policy.yaml")],
        ["sd", "pipeline", str(root / "sd")],
    ]


def test_models_list_bad_registry_exits_1_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from diffmesh.cli.main import main

    reg_file = tmp_path / "registry.yaml"
    reg_file.write_text("models:\n  a: {path: a, kind: nope}\n")
    assert main(["models", "list", "--registry", str(reg_file)]) == 1
    err = capsys.readouterr().err
    assert str(reg_file) in err and "'nope'" in err
