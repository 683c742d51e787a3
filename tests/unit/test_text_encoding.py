"""ClipPromptEncoder with weighting, long prompts, prompt_2 and clip_skip, checked against diffusers'
own encode_prompt wherever diffusers defines the answer."""
from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from diffmesh.errors import InvalidArgument
from services.text_encoder.encoder import ClipPromptEncoder
from services.text_encoder.prompt_weighting import apply_weights

CPU = torch.device("cpu")
UNWEIGHTED = ["a photo of a cat", "", "   ", "a cat, 4k: hdr \\ sharp", "BREAKfast", "cat " * 75]
LONG = "cat " * 150 + "dog " * 50          # 200 tokens: windows of 75, 75, 50


@pytest.fixture(scope="module")
def sd15(entries):
    entry = entries["tiny-sd15"]
    return (ClipPromptEncoder(entry, CPU, torch.float32),
            StableDiffusionPipeline.from_pretrained(entry.path, local_files_only=True))


@pytest.fixture(scope="module")
def sdxl(entries):
    entry = entries["tiny-sdxl"]
    return (ClipPromptEncoder(entry, CPU, torch.float32),
            StableDiffusionXLPipeline.from_pretrained(entry.path, local_files_only=True, add_watermarker=False))


def sd15_want(pipe, prompt, negative, clip_skip=None):
    if clip_skip is not None and not hasattr(pipe.text_encoder, "text_model"):
        # transformers 5 flattened CLIPTextModel; diffusers 0.42.1's clip_skip path still reads
        # text_encoder.text_model.final_layer_norm (huggingface/diffusers#14124). Alias it, without
        # registering a submodule, so that diffusers' own code runs unchanged.
        object.__setattr__(pipe.text_encoder, "text_model", pipe.text_encoder)
    return pipe.encode_prompt(prompt, CPU, 1, True, negative_prompt=negative, clip_skip=clip_skip)


def sdxl_want(pipe, prompt, negative, **kwargs):
    return pipe.encode_prompt(prompt, device=CPU, num_images_per_prompt=1, do_classifier_free_guidance=True,
                              negative_prompt=negative, **kwargs)


def fields(got):
    return (got.prompt_embeds, got.negative_prompt_embeds, got.pooled_prompt_embeds,
            got.negative_pooled_prompt_embeds)


@pytest.mark.parametrize("prompt", UNWEIGHTED)
def test_unweighted_short_prompts_equal_diffusers_exactly(sd15, sdxl, prompt):
    encoder, pipe = sd15
    want = sd15_want(pipe, prompt, "ugly, blurry")
    for weighting in (True, False):
        got = encoder.encode(prompt, "ugly, blurry", True, weighting=weighting)
        assert torch.equal(got.prompt_embeds, want[0]) and torch.equal(got.negative_prompt_embeds, want[1])
    encoder, pipe = sdxl
    for negative in ("ugly", "", None):
        want = sdxl_want(pipe, prompt, negative)
        for weighting in (True, False):
            got = encoder.encode(prompt, negative, True, weighting=weighting)
            assert all(torch.equal(w, g) for w, g in zip(want, fields(got)))


def test_explicit_weight_one_equals_the_plain_prompt(sd15, sdxl):
    for encoder, _ in (sd15, sdxl):
        plain = encoder.encode("a cat sat on the mat", "ugly", True)
        for written in ("a (cat:1.0) sat on the mat", "(a cat sat on the mat:1)", "a [(cat)] sat on the mat",
                        "a ((cat):0.9090909090909091) sat on the mat"):
            got = encoder.encode(written, "(ugly:1.0)", True)
            assert all(torch.equal(p, g) for p, g in zip(fields(plain), fields(got)) if p is not None), written


@pytest.mark.parametrize("clip_skip", [0, 1, 2])
def test_sd15_clip_skip_equals_diffusers(sd15, clip_skip):
    encoder, pipe = sd15
    got = encoder.encode("a photo of a cat", "ugly", True, clip_skip=clip_skip)
    assert torch.equal(got.prompt_embeds, sd15_want(pipe, "a photo of a cat", "ugly", clip_skip)[0])
    # diffusers applies clip_skip to the prompt only; we apply it to the negative prompt too, so the
    # negative equals diffusers' encoding of the negative text *as a prompt*
    assert torch.equal(got.negative_prompt_embeds, sd15_want(pipe, "ugly", None, clip_skip)[0])
    default = encoder.encode("a photo of a cat", None, False).prompt_embeds
    assert torch.allclose(got.prompt_embeds, default) == (clip_skip == 0)   # 0 is the default layer


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_sdxl_clip_skip_equals_diffusers(sdxl, clip_skip):
    encoder, pipe = sdxl
    got = encoder.encode("a photo of a cat", "ugly", True, clip_skip=clip_skip)
    want = sdxl_want(pipe, "a photo of a cat", "ugly", clip_skip=clip_skip)
    assert torch.equal(got.prompt_embeds, want[0]) and torch.equal(got.pooled_prompt_embeds, want[2])
    want_negative = sdxl_want(pipe, "ugly", None, clip_skip=clip_skip)
    assert torch.equal(got.negative_prompt_embeds, want_negative[0])
    assert torch.equal(got.negative_pooled_prompt_embeds, want_negative[2])
    default = encoder.encode("a photo of a cat", None, False).prompt_embeds
    assert torch.equal(got.prompt_embeds, default) == (clip_skip == 0)   # 0 is the default hidden_states[-2]


@pytest.mark.parametrize("clip_skip", [-1, 3, 1.0, True, "1"])
def test_clip_skip_out_of_range_is_invalid(sd15, sdxl, clip_skip):
    with pytest.raises(InvalidArgument) as info:
        sd15[0].encode("a cat", None, False, clip_skip=clip_skip)
    assert info.value.field == "clip_skip"
    with pytest.raises(InvalidArgument):
        sdxl[0].encode("a cat", None, False, clip_skip=2 if clip_skip == 3 else clip_skip)  # 2 layers: max 1


def test_sd15_has_no_second_prompt(sd15):
    with pytest.raises(InvalidArgument) as info:
        sd15[0].encode("a cat", None, False, prompt_2="a dog")
    assert info.value.field == "prompt_2"
    sd15[0].encode("a cat", None, False, prompt_2="", negative_prompt_2=None)  # empty is "not given"


def test_sdxl_prompt_2_equals_diffusers(sdxl):
    encoder, pipe = sdxl
    cases = [("a cat", "an oil painting", "ugly", "blurry"), ("a cat", "an oil painting", "ugly", None),
             ("a cat", None, "ugly", "blurry"), ("a cat", "", "", "blurry"), ("a cat", "a dog", None, "blurry")]
    for prompt, prompt_2, negative, negative_2 in cases:
        want = sdxl_want(pipe, prompt, negative, prompt_2=prompt_2, negative_prompt_2=negative_2)
        got = encoder.encode(prompt, negative, True, prompt_2=prompt_2, negative_prompt_2=negative_2)
        assert all(torch.equal(w, g) for w, g in zip(want, fields(got))), (prompt_2, negative, negative_2)
    differs = encoder.encode("a cat", "ugly", True, prompt_2="an oil painting")
    same = encoder.encode("a cat", "ugly", True)
    assert torch.equal(differs.prompt_embeds[..., :16], same.prompt_embeds[..., :16])  # text_encoder: D=16
    assert not torch.equal(differs.prompt_embeds[..., 16:], same.prompt_embeds[..., 16:])
    assert not torch.equal(differs.pooled_prompt_embeds, same.pooled_prompt_embeds)


def test_long_prompts_are_windows_of_77(sd15, sdxl):
    for (encoder, _), dim in ((sd15, 32), (sdxl, 48)):
        got = encoder.encode(LONG, "ugly", True)
        assert got.prompt_embeds.shape == (1, 231, dim) and got.negative_prompt_embeds.shape == (1, 231, dim)
        # every window is encoded alone: window 1 is [BOS] + tokens 75..149 + [EOS], window 3 is
        # the last 50 tokens; the negative is "ugly" then two windows of the empty prompt
        windows = [encoder.encode(text, None, False).prompt_embeds
                   for text in ("cat " * 75, "cat " * 75, "dog " * 50)]
        assert torch.allclose(got.prompt_embeds, torch.cat(windows, dim=1), atol=1e-5)
        empty = encoder.encode("", None, False).prompt_embeds
        assert torch.allclose(got.negative_prompt_embeds,
                              torch.cat([encoder.encode("ugly", None, False).prompt_embeds, empty, empty], dim=1),
                              atol=1e-5)
        short = encoder.encode("a cat", LONG, True)   # a long negative pads the positive
        assert short.prompt_embeds.shape == short.negative_prompt_embeds.shape == (1, 231, dim)
        assert encoder.encode(LONG + "BREAK cat", None, False).prompt_embeds.shape == (1, 308, dim)


def test_sdxl_long_prompt_pooled_and_zero_negatives(sdxl):
    encoder, _ = sdxl
    got = encoder.encode(LONG, None, True)
    first = encoder.encode("cat " * 75, None, False)
    assert torch.allclose(got.pooled_prompt_embeds, first.pooled_prompt_embeds, atol=1e-5)  # first window
    assert got.pooled_prompt_embeds.shape == (1, 32)
    assert got.negative_prompt_embeds.shape == (1, 231, 48) and not got.negative_prompt_embeds.any()
    assert not got.negative_pooled_prompt_embeds.any()
    # prompt and prompt_2 of different lengths: the shorter is padded with empty windows
    mixed = encoder.encode(LONG, "ugly", True, prompt_2="an oil painting")
    assert mixed.prompt_embeds.shape == mixed.negative_prompt_embeds.shape == (1, 231, 48)
    empty = encoder.encode("", None, False).prompt_embeds[..., 16:]
    assert torch.allclose(mixed.prompt_embeds[:, 77:154, 16:], empty, atol=1e-5)


def test_a_weight_changes_only_its_token_then_the_mean_is_restored(sd15, sdxl):
    for encoder, _ in (sd15, sdxl):
        plain = encoder.encode("a cat sat", None, False).prompt_embeds
        got = encoder.encode("a (cat:1.5) sat", None, False).prompt_embeds
        assert not torch.equal(got, plain)
        weights = torch.ones(1, 77)
        weights[0, 2] = 1.5                                   # [BOS] a cat sat [EOS] ...
        if encoder.is_sdxl:   # each encoder's half is weighted and mean-restored on its own
            parts = [apply_weights(plain[..., :16], weights), apply_weights(plain[..., 16:], weights)]
            expected = torch.cat(parts, dim=-1)
            raw = torch.cat([apply_weights(p, weights, restore_mean=False) for p in
                             (plain[..., :16], plain[..., 16:])], dim=-1)
        else:
            expected, raw = apply_weights(plain, weights), apply_weights(plain, weights, restore_mean=False)
        assert torch.allclose(got, expected, atol=1e-6)
        assert (raw != plain).any(dim=-1).nonzero()[:, 1].tolist() == [2]   # before restoring: token 2 only
        assert torch.allclose(raw[0, 2], plain[0, 2] * 1.5)
        for half in ((slice(None, 16), slice(16, None)) if encoder.is_sdxl else (slice(None),)):
            assert torch.allclose(got[..., half].mean(), plain[..., half].mean(), atol=1e-6)


def test_weighting_off_takes_brackets_literally(sd15):
    encoder, pipe = sd15
    got = encoder.encode("a (cat:1.5)", None, False, weighting=False).prompt_embeds
    assert torch.equal(got, sd15_want(pipe, "a (cat:1.5)", None)[0])
    assert not torch.equal(got, encoder.encode("a (cat:1.5)", None, False).prompt_embeds)


def test_positional_call_still_works(sd15, sdxl):
    """The servicer calls encode(prompt, negative_prompt, with_negative) positionally."""
    got = sd15[0].encode("a cat", None, False)
    assert got.negative_prompt_embeds is None and got.prompt_embeds.shape == (1, 77, 32)
    got = sdxl[0].encode("a cat", "ugly", False)
    assert got.negative_prompt_embeds is None and got.pooled_prompt_embeds.shape == (1, 32)


def test_sd15_attention_mask_matches_the_tokenizers(sd15):
    """Encoders whose config sets use_attention_mask get the tokenizer's mask: BOS, tokens and the
    first EOS attend, the padding does not (SD 1.x pads with EOS, so `ids != pad` would be wrong)."""
    encoder, pipe = sd15
    config = encoder.encoders[0].config
    assert encoder.encoders[0] is not pipe.text_encoder
    unmasked = encoder.encode("a photo of a cat", None, False).prompt_embeds
    try:
        config.use_attention_mask = pipe.text_encoder.config.use_attention_mask = True
        want = sd15_want(pipe, "a photo of a cat", "ugly")
        got = encoder.encode("a photo of a cat", "ugly", True)
        assert torch.equal(got.prompt_embeds, want[0]) and torch.equal(got.negative_prompt_embeds, want[1])
        assert not torch.equal(got.prompt_embeds, unmasked)   # the mask did change the padding's states
    finally:
        del config.use_attention_mask, pipe.text_encoder.config.use_attention_mask


def test_half_precision_weighting_keeps_the_dtype(entries):
    encoder = ClipPromptEncoder(entries["tiny-sdxl"], CPU, torch.bfloat16)
    got = encoder.encode("a (cat:1.3) " + LONG, "[ugly]", True)
    assert got.prompt_embeds.dtype == got.negative_prompt_embeds.dtype == torch.bfloat16
    assert got.prompt_embeds.shape == got.negative_prompt_embeds.shape == (1, 231, 48)
    assert torch.isfinite(got.prompt_embeds).all() and got.pooled_prompt_embeds.dtype == torch.bfloat16
