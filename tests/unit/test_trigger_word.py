"""Identity prompts (PhotoMaker V2's trigger word) in the text_encoder: the trigger is removed, the
class word repeated, the repeats' positions reported, the text-only prompt encoded alongside."""
from __future__ import annotations

import asyncio

import pytest
import torch

from diffmesh.errors import InvalidArgument
from diffmesh.proto.v1 import text_encoder_pb2
from diffmesh.runtime import codec
from diffmesh.runtime.server import Admission
from services.text_encoder.encoder import ClipPromptEncoder, EmbeddingCache, check_identity
from services.text_encoder.prompt_weighting import (
    BREAK, TokenChunk, chunk_tokens, expand_trigger, tokenize_weighted, window_ids)
from services.text_encoder.servicer import TextEncoderServicer

CPU = torch.device("cpu")
PROMPT = "a photo of a woman img"


@pytest.fixture(scope="module")
def sd15(entries):
    return ClipPromptEncoder(entries["tiny-sd15"], CPU, torch.float32)


@pytest.fixture(scope="module")
def sdxl(entries):
    return ClipPromptEncoder(entries["tiny-sdxl"], CPU, torch.float32)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def encoder(request, sd15, sdxl):
    return {"sd15": sd15, "sdxl": sdxl}[request.param]


def identity(encoder, prompt, repeats=4, negative="ugly", **kwargs):
    return encoder.encode(prompt, negative, negative is not None, trigger_word="img",
                          class_word_repeats=repeats, **kwargs)


def encoded_ids(encoder, prompt, repeats, index=0):
    """The token ids encoder `index` reads for the identity prompt, windows concatenated."""
    chunks, positions, _ = encoder._identity_chunks(index, prompt, True, "img", repeats, "prompt")
    ids = [token for chunk in chunks for token in window_ids(encoder.tokenizers[index], chunk)[0]]
    return ids, positions


def test_positions_point_at_the_repeated_class_tokens(encoder):
    got = identity(encoder, PROMPT)
    assert got.class_token_positions == (5, 6, 7, 8)          # [BOS] a photo of a woman x4
    for index, tokenizer in enumerate(encoder.tokenizers):
        ids, positions = encoded_ids(encoder, PROMPT, 4, index)
        assert tuple(positions) == got.class_token_positions
        assert [tokenizer.decode([ids[p]]).strip() for p in positions] == ["woman"] * 4
        assert max(ids) < len(tokenizer)                       # the trigger's id 49408 never reaches it
    # the repeated prompt is exactly the prompt with the class word written four times
    plain = encoder.encode("a photo of a woman woman woman woman", "ugly", True)
    assert torch.equal(got.prompt_embeds, plain.prompt_embeds)
    assert torch.equal(got.negative_prompt_embeds, plain.negative_prompt_embeds)
    if encoder.is_sdxl:
        assert torch.equal(got.pooled_prompt_embeds, plain.pooled_prompt_embeds)


def test_text_only_is_the_prompt_without_the_trigger(encoder):
    for prompt, without in ((PROMPT, "a photo of a woman"), ("a woman img, smiling", "a woman, smiling"),
                            ("(a woman img:1.2) in a park", "(a woman:1.2) in a park")):
        got = identity(encoder, prompt)
        want = encoder.encode(without, None, False)
        assert got.text_only_prompt_embeds.shape == got.prompt_embeds.shape
        assert torch.equal(got.text_only_prompt_embeds, want.prompt_embeds), prompt
        if encoder.is_sdxl:
            assert torch.equal(got.text_only_pooled_prompt_embeds, want.pooled_prompt_embeds)
            assert not torch.equal(got.text_only_pooled_prompt_embeds, got.pooled_prompt_embeds)
        else:
            assert got.text_only_pooled_prompt_embeds is None and got.pooled_prompt_embeds is None


def test_one_repeat_keeps_the_class_word_once(sd15):
    got = identity(sd15, PROMPT, repeats=1)
    assert got.class_token_positions == (5,)
    assert torch.equal(got.prompt_embeds, got.text_only_prompt_embeds)


def test_the_trigger_is_one_token_whatever_touches_it(sd15):
    # "img," and "imgs": a special token never merges with its neighbours
    assert identity(sd15, "a woman img, smiling", 2).class_token_positions == (2, 3)
    assert torch.equal(identity(sd15, "a woman imgs", 2).prompt_embeds,
                       sd15.encode("a woman woman s", None, False).prompt_embeds)


@pytest.mark.parametrize("prompt,count", [("a photo of a woman", 0), ("a woman img and a man img", 2),
                                          ("img img img", 3), ("", 0)])
def test_not_exactly_one_trigger_is_invalid(encoder, prompt, count):
    with pytest.raises(InvalidArgument) as info:
        identity(encoder, prompt)
    assert info.value.field == "prompt" and info.value.value == count
    assert f'exactly one trigger word "img" is needed, found {count}' in str(info.value)
    assert "woman" not in str(info.value)                      # never the prompt text


@pytest.mark.parametrize("prompt", ["img zebra", "img", "a zebra BREAK img smiling", "(img:1.2) a zebra"])
def test_the_trigger_must_follow_a_class_word(sd15, prompt):
    with pytest.raises(InvalidArgument) as info:
        identity(sd15, prompt)
    assert info.value.field == "prompt" and "follow its class word" in info.value.reason
    assert "zebra" not in str(info.value)


def test_repeats_across_a_window_boundary(encoder):
    prompt = "cat " * 73 + "woman img"          # woman is token 73: two copies in window 0, two in 1
    got = identity(encoder, prompt)
    assert got.class_token_positions == (74, 75, 78, 79)    # 77 + 1 (window 1's BOS) + 0, 1
    ids, positions = encoded_ids(encoder, prompt, 4)
    assert [encoder.tokenizers[0].decode([ids[p]]).strip() for p in positions] == ["woman"] * 4
    assert ids[76] == encoder.tokenizers[0].eos_token_id and ids[77] == encoder.tokenizers[0].bos_token_id
    # the repeated prompt has two windows: the text-only one (74 tokens) and the negative are padded
    # with an empty window, the way a short prompt is padded to a long negative
    width = got.prompt_embeds.shape[-1]
    assert got.prompt_embeds.shape == got.text_only_prompt_embeds.shape == got.negative_prompt_embeds.shape \
        == (1, 154, width)
    empty = encoder.encode("", None, False).prompt_embeds
    want = encoder.encode("cat " * 73 + "woman", None, False).prompt_embeds
    assert torch.allclose(got.text_only_prompt_embeds, torch.cat([want, empty], dim=1), atol=1e-5)
    assert torch.allclose(got.negative_prompt_embeds, torch.cat(
        [encoder.encode("ugly", None, False).prompt_embeds, empty], dim=1), atol=1e-5)
    # and it is what the plain text with the class word four times gives
    plain = encoder.encode("cat " * 73 + "woman " * 4, None, False).prompt_embeds
    assert torch.equal(got.prompt_embeds, plain)


def test_positions_after_a_break(sd15):
    got = identity(sd15, "a park BREAK a woman img", 2)
    assert got.class_token_positions == (77 + 2, 77 + 3)      # window 1: [BOS] a woman woman
    ids, positions = encoded_ids(sd15, "a park BREAK a woman img", 2)
    assert [sd15.tokenizers[0].decode([ids[p]]).strip() for p in positions] == ["woman"] * 2


def test_a_weight_on_the_class_word_applies_to_every_repeat(encoder):
    want = encoder.encode("a photo of a (woman woman woman woman:1.3)", None, False).prompt_embeds
    for prompt in ("a photo of a (woman:1.3) img", "a photo of a (woman img:1.3)"):
        got = identity(encoder, prompt, negative=None)
        assert got.class_token_positions == (5, 6, 7, 8)
        assert torch.equal(got.prompt_embeds, want), prompt
    # the trigger itself carries no weight
    unweighted = identity(encoder, PROMPT, negative=None).prompt_embeds
    assert torch.equal(identity(encoder, "a photo of a woman (img:1.5)", negative=None).prompt_embeds, unweighted)
    assert not torch.equal(want, unweighted)


def test_literal_prompts_take_the_trigger_too(sd15):
    got = identity(sd15, "a (woman img)", 2, negative=None, weighting=False)
    assert got.class_token_positions == (3, 4)                # [BOS] a ( woman woman )
    assert torch.equal(got.prompt_embeds, sd15.encode("a (woman woman)", None, False, weighting=False).prompt_embeds)


def test_the_plain_path_is_unchanged(encoder):
    for prompt in ("a photo of a woman img", "a cat"):
        before = encoder.encode(prompt, "ugly", True)
        again = encoder.encode(prompt, "ugly", True, trigger_word=None, class_word_repeats=None)
        after = encoder.encode(prompt, "ugly", True, trigger_word="", class_word_repeats=0)
        for got in (again, after):
            assert torch.equal(got.prompt_embeds, before.prompt_embeds)
            assert got.class_token_positions == () and got.text_only_prompt_embeds is None
            assert got.text_only_pooled_prompt_embeds is None
    identity(encoder, PROMPT)
    # the shared tokenizers were not changed: "img" is still the ordinary word for other requests
    for tokenizer in encoder.tokenizers:
        assert len(tokenizer) == 49408
        assert tokenizer("img", add_special_tokens=False).input_ids == [24157]


def test_the_negative_reads_the_trigger_as_plain_text(sd15):
    got = identity(sd15, PROMPT, negative="img, blurry")
    assert torch.equal(got.negative_prompt_embeds, sd15.encode("img, blurry", None, False).prompt_embeds)


def test_sdxl_prompt_2_must_agree_with_the_prompt(sdxl):
    same = identity(sdxl, PROMPT, prompt_2="a photo of a woman img")
    assert same.class_token_positions == (5, 6, 7, 8)
    other = identity(sdxl, PROMPT, prompt_2="an oil of a woman img")   # same positions, other words
    assert other.class_token_positions == (5, 6, 7, 8)
    assert torch.equal(other.prompt_embeds[..., :16], same.prompt_embeds[..., :16])
    assert not torch.equal(other.prompt_embeds[..., 16:], same.prompt_embeds[..., 16:])
    with pytest.raises(InvalidArgument) as info:
        identity(sdxl, PROMPT, prompt_2="a woman img")
    assert info.value.field == "prompt_2"
    with pytest.raises(InvalidArgument) as info:
        identity(sdxl, PROMPT, prompt_2="an oil painting")            # no trigger in prompt_2
    assert info.value.field == "prompt_2" and info.value.value == 0


def test_sdxl_zero_negatives_keep_the_identity_fields(sdxl):
    got = sdxl.encode(PROMPT, None, True, trigger_word="img", class_word_repeats=2)
    assert not got.negative_prompt_embeds.any() and not got.negative_pooled_prompt_embeds.any()
    assert got.class_token_positions == (5, 6) and got.text_only_pooled_prompt_embeds.shape == (1, 32)


def test_repeats_count_towards_max_windows(sd15):
    prompt = "cat " * 73 + "woman img"
    assert identity(sd15, prompt, 2, max_windows=1).prompt_embeds.shape == (1, 77, 32)
    with pytest.raises(InvalidArgument) as info:
        identity(sd15, prompt, 3, max_windows=1)
    assert info.value.field == "prompt"


@pytest.mark.parametrize("trigger,repeats,field", [
    ("img", 0, "class_word_repeats"), ("img", -1, "class_word_repeats"), ("img", 65, "class_word_repeats"),
    ("img", True, "class_word_repeats"), ("img", None, "class_word_repeats"), ("", 2, "class_word_repeats"),
    (None, 4, "class_word_repeats"), ("im g", 2, "trigger_word"), ("img\t", 2, "trigger_word"),
    ("(img)", 2, "trigger_word"), ("img:1", 2, "trigger_word"), ("BREAK", 2, "trigger_word"),
    ("x" * 33, 2, "trigger_word")])
def test_identity_options_are_checked(trigger, repeats, field):
    with pytest.raises(InvalidArgument) as info:
        check_identity(trigger, repeats)
    assert info.value.field == field


def test_identity_options_off_and_on():
    assert check_identity(None, None) is False and check_identity("", 0) is False
    assert check_identity("img", 1) is True and check_identity("img", 64) is True


def test_a_word_the_tokenizer_already_has_is_refused(sd15):
    with pytest.raises(InvalidArgument) as info:
        sd15.encode("a woman <|endoftext|>", None, False, trigger_word="<|endoftext|>", class_word_repeats=2)
    assert info.value.field == "trigger_word"


def test_expand_trigger_on_a_stream():
    stream = [(1, 1.0), (2, 1.3), (99, 1.5), BREAK, (3, 1.0)]
    got = expand_trigger(stream, 99, 3, trigger_word="img")
    assert got.repeated == [(1, 1.0), (2, 1.3), (2, 1.3), (2, 1.3), BREAK, (3, 1.0)]
    assert got.text_only == [(1, 1.0), (2, 1.3), BREAK, (3, 1.0)]
    assert list(got.class_indices) == [1, 2, 3]
    chunks, positions = chunk_tokens(_Tokenizer(), got.repeated, got.class_indices)
    assert positions == [2, 3, 4] and [c.ids for c in chunks] == [[1, 2, 2, 2], [3]]


class _Tokenizer:
    model_max_length = 77


def test_tokenize_weighted_is_stream_then_chunks(sd15):
    tokenizer = sd15.tokenizers[0]
    parsed = [("cat " * 80, 1.2), BREAK, BREAK, ("a dog", 1.0)]
    chunks = tokenize_weighted(tokenizer, parsed)
    assert [len(c.ids) for c in chunks] == [75, 5, 0, 2]
    assert tokenize_weighted(tokenizer, [("", 1.0)]) == [TokenChunk()]


# -- the servicer: the stage checks the fields itself, and its cache keys on them ---------------
class _Models:
    def __init__(self, model):
        self.model = model

    def get(self, model_id, field="model_id"):
        return self.model


def _servicer(model):
    return TextEncoderServicer(_Models(model), Admission("text_encoder", 1, 4), EmbeddingCache(16))


def _call(servicer, **fields):
    return asyncio.run(servicer.Encode(text_encoder_pb2.EncodeTextRequest(model_id="tiny-sdxl", **fields), None))


def test_the_servicer_returns_the_identity_fields(sdxl):
    servicer = _servicer(sdxl)
    reply = _call(servicer, prompt=PROMPT, trigger_word="img", class_word_repeats=4, with_negative=True)
    want = identity(sdxl, PROMPT, negative=None)
    assert list(reply.class_token_positions) == [5, 6, 7, 8] and not reply.cache_hit
    assert torch.equal(codec.to_torch(reply.text_only_prompt_embeds, "t"), want.text_only_prompt_embeds)
    assert torch.equal(codec.to_torch(reply.text_only_pooled_prompt_embeds, "t"), want.text_only_pooled_prompt_embeds)
    assert torch.equal(codec.to_torch(reply.prompt_embeds, "t"), want.prompt_embeds)
    again = _call(servicer, prompt=PROMPT, trigger_word="img", class_word_repeats=4, with_negative=True)
    assert again.cache_hit and list(again.class_token_positions) == [5, 6, 7, 8]
    other = _call(servicer, prompt=PROMPT, trigger_word="img", class_word_repeats=2, with_negative=True)
    assert not other.cache_hit and list(other.class_token_positions) == [5, 6]
    plain = _call(servicer, prompt="a photo of a woman", with_negative=True)
    assert not plain.cache_hit and not plain.class_token_positions
    assert not plain.HasField("text_only_prompt_embeds") and not plain.HasField("text_only_pooled_prompt_embeds")


@pytest.mark.parametrize("fields,name", [
    (dict(prompt=PROMPT, class_word_repeats=4), "class_word_repeats"),
    (dict(prompt=PROMPT, trigger_word="img"), "class_word_repeats"),
    (dict(prompt=PROMPT, trigger_word="i mg", class_word_repeats=2), "trigger_word"),
    (dict(prompt="a woman img img", trigger_word="img", class_word_repeats=2), "prompt")])
def test_the_servicer_refuses_bad_identity_fields(sdxl, fields, name):
    with pytest.raises(InvalidArgument) as info:
        _call(_servicer(sdxl), **fields)
    assert info.value.field == name
