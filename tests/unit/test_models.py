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
from diffmesh.models.registry import (
    ModelError,
    ModelFamily,
    Registry,
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
    assert registry.ids() == [SD15_ID, SDXL_ID]
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
