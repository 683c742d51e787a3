"""Prompt weighting and long prompts, with the semantics users know from AUTOMATIC1111's web UI.

Three steps, each plain Python / torch and testable alone:

1. `parse_prompt_weights(text)`: the attention syntax -> [(text, weight), ...] segments.
     (word:1.3)  weight 1.3          (word)  x 1.1          [word]  / 1.1
     nesting multiplies: ((word)) = 1.21, ((word:1.5)) = 1.65, [(word)] = 1.0
     \\( \\) \\[ \\] \\\\     the literal characters ( ) [ ] \\
     BREAK        (upper case, a whole word, outside an escape) ends the current 75-token window
   Unbalanced brackets behave as in A1111: an unclosed ( or [ applies its multiplier to the rest of
   the prompt; a ) or ] with no open bracket of its kind is literal text. A weight must be a finite
   decimal number (0.5, .5, -1, 1e-1); anything else after the colon, e.g. (a:abc), is text and the
   brackets act as plain ( ): [("a:abc", 1.1)]. Deviations from A1111, both on purpose: exponents
   are accepted (A1111's pattern accepts "1.2.3" and then fails on it), and a backslash not followed
   by ( ) [ ] \\ stays a literal backslash (A1111 drops it).
   Adjacent segments of equal weight are merged, so "a (cat:1.0) sat" is the single segment
   "a cat sat" and tokenises exactly like the unweighted prompt.

2. `tokenize_weighted(tokenizer, segments)`: each segment is tokenised alone, without BOS/EOS, and
   every token keeps its segment's weight; the token stream is cut into chunks of
   model_max_length - 2 = 75 tokens (a BREAK cuts early). `window_ids` wraps a chunk the way the
   tokenizer itself pads (`padding="max_length"`): [BOS] + tokens + [EOS] + [pad] * (75 - n). The
   EOS comes right after the last token and the padding after it, as diffusers and A1111 lay it
   out; that keeps the pooled output (taken at the first EOS) right when pad != EOS (SDXL's
   tokenizer_2 pads with "!").
   It is `token_stream` (the (id, weight) stream with BREAKs) then `chunk_tokens` (the cut, which
   also says where given stream tokens land along the encoded sequence). Identity prompts
   (PhotoMaker's trigger word) rewrite the stream in between: `expand_trigger`.

3. `apply_weights(hidden, weights)`: A1111's "Original" emphasis, per 77-token window (A1111 runs
   it once per chunk): z = z * w per token; z = z * (mean_before / mean_after), the mean being the
   scalar mean over the whole window (every token, every channel). With all weights 1 the encoder
   skips it, so an unweighted prompt is bit-for-bit what diffusers' encode_prompt gives.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Collection, Sequence, Union

import torch

from diffmesh.errors import InvalidArgument

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1


class _Break:
    """The BREAK keyword in a parsed prompt: the next tokens start a new 75-token window."""

    _instance: "_Break | None" = None

    def __new__(cls) -> "_Break":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "BREAK"

    def __reduce__(self):  # stays a singleton through copy / pickle
        return (_Break, ())


BREAK = _Break()
Segment = tuple[str, float]
ParsedPrompt = list[Union[Segment, _Break]]

_ESCAPABLE = "()[]\\"
# ":" then a finite decimal number, then ")": "(a:1.3)", "(a: -0.5 )", "(a:1e-1)", "(a:.5)".
_WEIGHT = re.compile(r":\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\)")
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_weights(text: str, *, breaks: bool = True) -> ParsedPrompt:
    """The prompt as [(text, weight), ...], adjacent equal weights merged; BREAK where the prompt
    has the keyword (only with breaks=True). Never empty: "" parses to [("", 1.0)]."""
    out: list = []          # [text, weight] lists (mutable while brackets close) and BREAK
    round_open: list[int] = []   # index into `out` where each open "(" starts
    square_open: list[int] = []
    pending: list[str] = []      # literal characters not yet in `out`

    def flush() -> None:
        if not pending:
            return
        literal = "".join(pending)
        pending.clear()
        parts = _BREAK_WORD.split(literal) if breaks else [literal]
        for i, part in enumerate(parts):
            if i:
                out.append(BREAK)
            if part:
                out.append([part, 1.0])

    def scale(start: int, multiplier: float) -> None:
        flush()
        for item in out[start:]:
            if item is not BREAK:
                item[1] *= multiplier

    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == "\\" and i + 1 < n and text[i + 1] in _ESCAPABLE:
            pending.append(text[i + 1])
            i += 2
            continue
        if char == "(":
            flush()
            round_open.append(len(out))
        elif char == "[":
            flush()
            square_open.append(len(out))
        elif char == ":" and round_open:
            match = _WEIGHT.match(text, i)
            weight = float(match.group(1)) if match else math.nan
            if match and math.isfinite(weight):
                scale(round_open.pop(), weight)
                i = match.end()
                continue
            pending.append(char)
        elif char == ")" and round_open:
            scale(round_open.pop(), ROUND_MULTIPLIER)
        elif char == "]" and square_open:
            scale(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            pending.append(char)
        i += 1
    flush()
    for start in round_open:      # unclosed: the multiplier runs to the end of the prompt
        scale(start, ROUND_MULTIPLIER)
    for start in square_open:
        scale(start, SQUARE_MULTIPLIER)

    merged: ParsedPrompt = []
    for item in out:
        if item is BREAK:
            merged.append(BREAK)
        elif merged and merged[-1] is not BREAK and merged[-1][1] == item[1]:
            merged[-1] = (merged[-1][0] + item[0], item[1])
        else:
            merged.append((item[0], item[1]))
    return merged or [("", 1.0)]


@dataclass
class TokenChunk:
    """Up to 75 content token ids (no BOS / EOS) and one weight per token."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def chunk_length(tokenizer) -> int:
    return tokenizer.model_max_length - 2


Token = tuple[int, float]   # (id, weight)
TokenStream = list[Union[Token, _Break]]


def tokenize_weighted(tokenizer, parsed: Sequence[Union[Segment, _Break]]) -> list[TokenChunk]:
    """Token ids with a weight each, cut into chunks of at most 75 tokens; at least one chunk.
    A BREAK closes the current chunk (an empty one too, as in A1111) unless it is already full."""
    return chunk_tokens(tokenizer, token_stream(tokenizer, parsed))[0]


def token_stream(tokenizer, parsed: Sequence[Union[Segment, _Break]]) -> TokenStream:
    """The prompt's tokens in order, (id, weight) each, BREAK where the prompt has it: every
    segment tokenised alone, without BOS / EOS (tokenize_weighted = token_stream + chunk_tokens)."""
    segments = [item for item in parsed if item is not BREAK]
    texts = [text for text, _ in segments]
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids \
        if texts else []
    token_lists = iter(encoded)
    stream: TokenStream = []
    for item in parsed:
        if item is BREAK:
            stream.append(BREAK)
        else:
            stream.extend((token, item[1]) for token in next(token_lists))
    return stream


def chunk_tokens(tokenizer, stream: Sequence[Union[Token, _Break]], marked: Collection[int] = ()
                 ) -> tuple[list[TokenChunk], list[int]]:
    """A token stream cut into chunks of at most 75 tokens (at least one; a BREAK closes the current
    chunk, an empty one too, unless it is already full), and where the tokens at the stream indices
    `marked` land along the encoded sequence: chunk c's token j sits at c * 77 + 1 + j (each
    77-token window starts with its BOS, see window_ids), in stream order."""
    size = chunk_length(tokenizer)
    width = size + 2
    marked = set(marked)
    chunks: list[TokenChunk] = []
    positions: list[int] = []
    current = TokenChunk()
    for index, item in enumerate(stream):
        if item is BREAK:
            chunks.append(current)
            current = TokenChunk()
            continue
        if len(current.ids) == size:
            chunks.append(current)
            current = TokenChunk()
        if index in marked:
            positions.append(len(chunks) * width + 1 + len(current.ids))
        current.ids.append(item[0])
        current.weights.append(item[1])
    if current.ids or not chunks:
        chunks.append(current)
    return chunks, positions


@dataclass(frozen=True)
class IdentityTokens:
    """An identity prompt's two token streams (see expand_trigger)."""

    repeated: TokenStream        # trigger removed, class token repeated
    class_indices: range         # the stream indices of the repeated class tokens in `repeated`
    text_only: TokenStream       # trigger removed, class token once


def expand_trigger(stream: TokenStream, trigger_id: int, repeats: int, *, trigger_word: str,
                   field: str = "prompt") -> IdentityTokens:
    """PhotoMaker's trigger-word rewrite on a token stream: the stream must hold `trigger_id`
    exactly once, right after its class token (the token before it, in the same window: not first,
    not after a BREAK). The trigger goes; the class token appears `repeats` times in all, each
    copy with the class token's weight (the trigger's own weight is dropped). Errors name `field`
    and carry counts, never prompt text."""
    found = [i for i, item in enumerate(stream) if item is not BREAK and item[0] == trigger_id]
    if len(found) != 1:
        raise InvalidArgument(field, len(found),
                              f'exactly one trigger word "{trigger_word}" is needed, found {len(found)}')
    at = found[0]
    if at == 0 or stream[at - 1] is BREAK:
        raise InvalidArgument(field, "no class word before the trigger word",
                              f'the trigger word "{trigger_word}" must follow its class word, '
                              f'as in "a photo of a woman {trigger_word}" (not first, not after BREAK)')
    class_token = stream[at - 1]
    head, tail = list(stream[:at]), list(stream[at + 1:])
    return IdentityTokens(repeated=head + [class_token] * (repeats - 1) + tail,
                          class_indices=range(at - 1, at - 1 + repeats), text_only=head + tail)


def window_ids(tokenizer, chunk: TokenChunk) -> tuple[list[int], list[float], list[int]]:
    """One 77-token window: ids, weights and attention mask, laid out as the tokenizer pads
    (`padding="max_length"`): [BOS] + tokens + [EOS] + [pad]*; BOS, EOS and pads weigh 1."""
    size = chunk_length(tokenizer)
    if len(chunk.ids) > size:
        raise ValueError(f"chunk of {len(chunk.ids)} tokens exceeds {size}")
    pad = size - len(chunk.ids)
    ids = [tokenizer.bos_token_id, *chunk.ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad
    weights = [1.0, *chunk.weights, 1.0] + [1.0] * pad
    mask = [1] * (len(chunk.ids) + 2) + [0] * pad
    return ids, weights, mask


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor, *, restore_mean: bool = True) -> torch.Tensor:
    """A1111 emphasis on windows of hidden states: hidden [W, T, D] (W windows), weights [W, T].
    Multiplies each token's vector by its weight; with restore_mean, rescales each window so its
    scalar mean over [T, D] is the mean it had before. Computed in float32, returned in hidden's dtype."""
    z = hidden.float()
    w = weights.to(device=z.device, dtype=torch.float32)
    weighted = z * w.unsqueeze(-1)
    if restore_mean:
        before = z.mean(dim=(1, 2), keepdim=True)
        after = weighted.mean(dim=(1, 2), keepdim=True)
        ratio = torch.where(after == 0, torch.ones_like(after), before / after)  # all-zero window: leave it
        weighted = weighted * ratio
    return weighted.to(hidden.dtype)
