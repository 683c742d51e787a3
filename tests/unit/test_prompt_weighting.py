"""Prompt weighting alone: the attention syntax parser, weighted tokenisation into 75-token
chunks / 77-token windows, and the A1111 weighting rule."""
from __future__ import annotations

import pickle

import pytest
import torch
from transformers import CLIPTokenizer

from services.text_encoder.prompt_weighting import (
    BREAK, TokenChunk, apply_weights, parse_prompt_weights, tokenize_weighted, window_ids)

UP, DOWN = 1.1, 1 / 1.1


def same(parsed, expected):
    """Parsed segments equal the expected ones: texts exactly, weights to float rounding."""
    assert len(parsed) == len(expected), parsed
    for got, want in zip(parsed, expected):
        if want is BREAK:
            assert got is BREAK, parsed
        else:
            assert got[0] == want[0] and got[1] == pytest.approx(want[1], rel=1e-12), parsed
    return True


@pytest.mark.parametrize("text,expected", [
    ("a cat", [("a cat", 1.0)]),
    ("", [("", 1.0)]),
    ("   ", [("   ", 1.0)]),
    ("()", [("", 1.0)]),
    ("a()b", [("ab", 1.0)]),
    ("(a)", [("a", UP)]),
    ("[a]", [("a", DOWN)]),
    ("((a))", [("a", UP * UP)]),
    ("[[a]]", [("a", DOWN * DOWN)]),
    ("[(a)]", [("a", 1.0)]),
    ("x (a [b] c) y", [("x ", 1.0), ("a ", UP), ("b", UP * DOWN), (" c", UP), (" y", 1.0)]),
    ("(a:1.3)", [("a", 1.3)]),
    ("(a: 0.5 )", [("a", 0.5)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a:1e-1)", [("a", 0.1)]),
    ("(a:2E+0)", [("a", 2.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:0)", [("a", 0.0)]),
    ("((a:1.5) b)", [("a", 1.5 * UP), (" b", UP)]),
    ("((a b:1.5))", [("a b", 1.5 * UP)]),
    ("[(a:1.5)]", [("a", 1.5 * DOWN)]),
    ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)]),
    ("big (cat:1.2), small (dog:0.8)", [("big ", 1.0), ("cat", 1.2), (", small ", 1.0), ("dog", 0.8)]),
])
def test_weights_and_nesting(text, expected):
    assert same(parse_prompt_weights(text), expected)


@pytest.mark.parametrize("text,expected", [
    ("(a:abc)", [("a:abc", UP)]),          # not a number: text, and the ( ) act as plain brackets
    ("(a:1.2.3)", [("a:1.2.3", UP)]),
    ("(a:inf)", [("a:inf", UP)]),
    ("(a:1e999)", [("a:1e999", UP)]),       # overflows to inf: not finite, so text
    ("(a:)", [("a:", UP)]),
    ("(a:1.2", [("a:1.2", UP)]),           # no ")" after the number: text, and "(" stays open
    ("a:1.2)", [("a:1.2)", 1.0)]),         # weight with no "(" open: all literal
    ("[a:1.2]", [("a:1.2", DOWN)]),        # weights only close round brackets
    ("time: 12:30", [("time: 12:30", 1.0)]),
])
def test_malformed_weights_are_text(text, expected):
    assert same(parse_prompt_weights(text), expected)


@pytest.mark.parametrize("text,expected", [
    ("(a b", [("a b", UP)]),                           # unclosed "(" runs to the end
    ("x [a b", [("x ", 1.0), ("a b", DOWN)]),
    ("x (a [b", [("x ", 1.0), ("a ", UP), ("b", UP * DOWN)]),
    ("((a) b", [("a", UP * UP), (" b", UP)]),
    ("a) b] c", [("a) b] c", 1.0)]),                     # stray closers are literal
    ("(a] b)", [("a] b", UP)]),                         # "]" with only "(" open is literal
    ("[a) b]", [("a) b", DOWN)]),
    ("(a)) b", [("a", UP), (") b", 1.0)]),
])
def test_unbalanced_brackets(text, expected):
    assert same(parse_prompt_weights(text), expected)


@pytest.mark.parametrize("text,expected", [
    (r"\(a\)", [("(a)", 1.0)]),
    (r"\[a\]", [("[a]", 1.0)]),
    (r"(\(a\):1.5)", [("(a)", 1.5)]),
    (r"(a\)", [("a)", UP)]),                  # an escaped ")" does not close
    (r"a\\(b)", [("a\\", 1.0), ("b", UP)]),   # "\\" is one literal backslash, "(" stays syntax
    (r"a\b c\:", [(r"a\b c\:", 1.0)]),        # other backslashes are literal
    ("a\\", [("a\\", 1.0)]),
    (r"smile \(happy\) (eyes:1.2)", [("smile (happy) ", 1.0), ("eyes", 1.2)]),
])
def test_escapes(text, expected):
    assert same(parse_prompt_weights(text), expected)


def test_adjacent_equal_weights_merge():
    assert parse_prompt_weights("a (cat:1.0) sat") == [("a cat sat", 1.0)]
    assert parse_prompt_weights("(a)(b)") == [("ab", pytest.approx(UP))]
    assert same(parse_prompt_weights("(a) (b)"), [("a", UP), (" ", 1.0), ("b", UP)])
    assert parse_prompt_weights("  a  cat \n") == [("  a  cat \n", 1.0)]


def test_break_keyword():
    assert parse_prompt_weights("a BREAK b") == [("a", 1.0), BREAK, ("b", 1.0)]
    assert parse_prompt_weights("a\nBREAK\n(b)")[1] is BREAK
    assert same(parse_prompt_weights("(a BREAK b)"), [("a", UP), BREAK, ("b", UP)])
    assert parse_prompt_weights("BREAK a") == [BREAK, ("a", 1.0)]
    for literal in ("aBREAK b", "break it", "BREAKS"):
        assert parse_prompt_weights(literal) == [(literal, 1.0)]
    assert parse_prompt_weights("a BREAK b", breaks=False) == [("a BREAK b", 1.0)]
    assert pickle.loads(pickle.dumps(BREAK)) is BREAK and repr(BREAK) == "BREAK"


@pytest.fixture(scope="module")
def tokenizers(tiny_models):
    return (CLIPTokenizer.from_pretrained(tiny_models / "tiny-sdxl" / "tokenizer"),
            CLIPTokenizer.from_pretrained(tiny_models / "tiny-sdxl" / "tokenizer_2"))


def content_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def test_segments_tokenise_like_the_whole_prompt(tokenizers):
    tokenizer = tokenizers[0]
    (chunk,) = tokenize_weighted(tokenizer, parse_prompt_weights("a (red:1.5) cat, [sitting] on a mat"))
    assert chunk.ids == content_ids(tokenizer, "a red cat, sitting on a mat")
    assert chunk.weights == pytest.approx([1.0, 1.5, 1.0, 1.0, DOWN, 1.0, 1.0, 1.0])
    (plain,) = tokenize_weighted(tokenizer, parse_prompt_weights("a (cat:1.0) sat"))
    assert plain.ids == content_ids(tokenizer, "a cat sat") and plain.weights == [1.0] * 3


def test_empty_prompt_is_one_empty_chunk(tokenizers):
    for text in ("", "   ", "()"):
        assert tokenize_weighted(tokenizers[0], parse_prompt_weights(text)) == [TokenChunk()]


def test_long_prompts_split_into_75_token_chunks(tokenizers):
    tokenizer = tokenizers[0]
    assert len(content_ids(tokenizer, "cat " * 200)) == 200
    chunks = tokenize_weighted(tokenizer, parse_prompt_weights("cat " * 150 + "(dog:1.3) " * 50))
    assert [len(c.ids) for c in chunks] == [75, 75, 50]
    assert chunks[1].weights == [1.0] * 75 and chunks[2].weights == pytest.approx([1.3] * 50)
    assert [len(c.ids) for c in tokenize_weighted(tokenizer, parse_prompt_weights("cat " * 75))] == [75]
    assert [len(c.ids) for c in tokenize_weighted(tokenizer, parse_prompt_weights("cat " * 76))] == [75, 1]


def test_break_starts_a_new_window(tokenizers):
    tokenizer = tokenizers[0]
    lengths = lambda text: [len(c.ids) for c in tokenize_weighted(tokenizer, parse_prompt_weights(text))]
    assert lengths("a cat BREAK a dog") == [2, 2]
    assert lengths("cat " * 75 + "BREAK dog") == [75, 1]   # a full chunk is not closed twice
    assert lengths("cat " * 80 + "BREAK dog") == [75, 5, 1]
    assert lengths("a cat BREAK") == [2]
    assert lengths("BREAK a cat") == [0, 2]                 # as A1111: a leading BREAK gives an empty window


@pytest.mark.parametrize("which", [0, 1])
def test_windows_are_laid_out_as_the_tokenizer_pads(tokenizers, which):
    tokenizer = tokenizers[which]   # tokenizer pads with EOS, tokenizer_2 with "!" (id 0)
    assert tokenizer.pad_token_id == (tokenizer.eos_token_id if which == 0 else 0)
    for text in ("a photo of a cat", "", "cat " * 75):
        (chunk,) = tokenize_weighted(tokenizer, parse_prompt_weights(text))
        ids, weights, mask = window_ids(tokenizer, chunk)
        want = tokenizer(text, padding="max_length", max_length=77, truncation=True)
        assert ids == want.input_ids and mask == want.attention_mask
        assert len(weights) == 77 and weights == [1.0] * 77
    ids, weights, _ = window_ids(tokenizer, TokenChunk([320, 2368], [1.0, 1.4]))
    assert ids[:4] == [tokenizer.bos_token_id, 320, 2368, tokenizer.eos_token_id]
    assert ids[4:] == [tokenizer.pad_token_id] * 73 and weights[:4] == [1.0, 1.0, 1.4, 1.0]


def test_weighting_scales_only_weighted_tokens_then_restores_each_window_mean():
    torch.manual_seed(0)
    hidden = torch.randn(2, 77, 8) + 0.5
    weights = torch.ones(2, 77)
    weights[0, 3] = 1.5
    weights[1, 10:12] = 0.5
    raw = apply_weights(hidden, weights, restore_mean=False)
    changed = (raw != hidden).any(dim=-1)
    assert changed.nonzero().tolist() == [[0, 3], [1, 10], [1, 11]]
    assert torch.allclose(raw[0, 3], hidden[0, 3] * 1.5) and torch.allclose(raw[1, 10], hidden[1, 10] * 0.5)
    restored = apply_weights(hidden, weights)
    for w in range(2):   # per window, the scalar mean over tokens and channels
        assert torch.allclose(restored[w].mean(), hidden[w].mean(), atol=1e-6)
        assert torch.allclose(restored[w], raw[w] * (hidden[w].mean() / raw[w].mean()))
    assert torch.equal(apply_weights(hidden, torch.ones(2, 77)), hidden)
    half = apply_weights(hidden.half(), weights)
    assert half.dtype == torch.float16 and torch.allclose(half.float(), restored, atol=1e-2)
