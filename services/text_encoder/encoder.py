"""Prompt -> CLIP hidden states, as diffusers' SD 1.x / SDXL pipelines encode prompts, plus prompt
weighting `(word:1.3)`, prompts longer than 77 tokens (77-token windows) and clip_skip; see
prompt_weighting.py for the syntax and the weighting rule. Plain torch + transformers; no gRPC.

An unweighted prompt of at most 75 tokens, with no prompt_2 and no clip_skip, gives exactly (bit for
bit) what diffusers' encode_prompt gives: same ids, same forward pass, and weighting is skipped when
every weight is 1."""
from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffmesh.models.registry import ModelEntry, ModelFamily
from diffmesh.errors import InvalidArgument
from services.text_encoder.prompt_weighting import (
    TokenChunk, apply_weights, chunk_tokens, expand_trigger, parse_prompt_weights, token_stream,
    tokenize_weighted, window_ids)

MAX_CLASS_WORD_REPEATS = 64    # PhotoMaker uses 2 per identity image; more only grows the sequence
MAX_TRIGGER_WORD_CHARS = 32
_TRIGGER_TOKENIZERS = 8        # tokenizer copies kept per encoder, one per trigger word seen lately
_NOT_IN_TRIGGER = "()[]\\:"    # prompt weighting syntax: a trigger holding it could not be found


def check_identity(trigger_word: str | None, class_word_repeats: int | None) -> bool:
    """Validates the identity-prompt options (PhotoMaker's trigger word); True when they are on.
    Off: no trigger_word (None or "") and no class_word_repeats (None or 0)."""
    if not trigger_word:
        if class_word_repeats:
            raise InvalidArgument("class_word_repeats", class_word_repeats, "is only meaningful with trigger_word")
        return False
    if not isinstance(trigger_word, str) or len(trigger_word) > MAX_TRIGGER_WORD_CHARS:
        raise InvalidArgument("trigger_word", trigger_word,
                              f"must be a word of at most {MAX_TRIGGER_WORD_CHARS} characters")
    if any(c.isspace() or not c.isprintable() for c in trigger_word):
        raise InvalidArgument("trigger_word", trigger_word, "must be one word: no whitespace or control characters")
    if any(c in _NOT_IN_TRIGGER for c in trigger_word) or trigger_word == "BREAK":
        raise InvalidArgument("trigger_word", trigger_word,
                              "must not hold prompt weighting syntax ( ) [ ] \\ : nor be BREAK")
    if (isinstance(class_word_repeats, bool) or not isinstance(class_word_repeats, int)
            or not 1 <= class_word_repeats <= MAX_CLASS_WORD_REPEATS):
        raise InvalidArgument("class_word_repeats", class_word_repeats,
                              f"must be from 1 to {MAX_CLASS_WORD_REPEATS} with trigger_word "
                              "(PhotoMaker: 2 per identity image)")
    return True


@dataclass(frozen=True)
class PromptEmbeddings:
    prompt_embeds: torch.Tensor                       # [1, 77 * k, D]: k windows of 77 tokens
    negative_prompt_embeds: torch.Tensor | None = None  # same shape as prompt_embeds
    pooled_prompt_embeds: torch.Tensor | None = None  # SDXL [1, P]
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    # identity prompts (trigger_word): where the repeated class tokens sit along prompt_embeds' seq
    # axis, and the text-only prompt (trigger removed, class word once), same shape / windows
    class_token_positions: tuple[int, ...] = ()
    text_only_prompt_embeds: torch.Tensor | None = None
    text_only_pooled_prompt_embeds: torch.Tensor | None = None  # SDXL


class ClipPromptEncoder:
    def __init__(self, entry: ModelEntry, device: torch.device, dtype: torch.dtype) -> None:
        self.entry = entry
        self.device = device
        self.is_sdxl = entry.family == ModelFamily.SDXL
        load = dict(local_files_only=True, torch_dtype=dtype)
        self.tokenizers = [CLIPTokenizer.from_pretrained(entry.component_dir("tokenizer"))]
        self.encoders: list[torch.nn.Module] = []
        if self.is_sdxl:
            self.tokenizers.append(CLIPTokenizer.from_pretrained(entry.component_dir("tokenizer_2")))
            self.encoders.append(CLIPTextModel.from_pretrained(entry.component_dir("text_encoder"), **load))
            self.encoders.append(CLIPTextModelWithProjection.from_pretrained(
                entry.component_dir("text_encoder_2"), **load))
        else:
            self.encoders.append(CLIPTextModel.from_pretrained(entry.component_dir("text_encoder"), **load))
        for encoder in self.encoders:
            encoder.to(device).eval()
        index = json.loads((entry.path / "model_index.json").read_text())
        # SDXL's pipelines use zero negative conditioning when no negative prompt is given.
        self.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", False))
        # hidden_states has num_hidden_layers + 1 entries; SD 1.x reads [-(k+1)], SDXL [-(k+2)].
        layers = min(encoder.config.num_hidden_layers for encoder in self.encoders)
        self.max_clip_skip = layers - 1 if self.is_sdxl else layers
        # (encoder index, trigger word) -> (copy of that tokenizer with the trigger added, its id)
        self._trigger_tokenizers: OrderedDict[tuple[int, str], tuple[CLIPTokenizer | None, int]] = OrderedDict()
        self._trigger_lock = threading.Lock()

    # -- tokens ---------------------------------------------------------------------------------
    def _chunks(self, tokenizer: CLIPTokenizer, text: str, weighting: bool) -> list[TokenChunk]:
        parsed = parse_prompt_weights(text) if weighting else [(text, 1.0)]
        return tokenize_weighted(tokenizer, parsed)

    def _trigger_tokenizer(self, index: int, trigger_word: str) -> tuple[CLIPTokenizer, int]:
        """Tokenizer `index` with the trigger word added as a special token (one token that never
        merges with its neighbours: "img," and "imgs" hold it too), and the trigger's id. A copy:
        the shared tokenizer, which other requests use, is never changed. The new id is the
        vocabulary's size (49408 for CLIP), past the text encoder's embedding table, so the trigger
        must never reach the encoder: expand_trigger removes it."""
        key = (index, trigger_word)
        with self._trigger_lock:
            found = self._trigger_tokenizers.get(key)
            if found is None:
                base = self.tokenizers[index]
                tokenizer = copy.deepcopy(base)
                added = tokenizer.add_tokens([trigger_word], special_tokens=True)
                trigger_id = tokenizer.convert_tokens_to_ids(trigger_word)
                # a word the tokenizer already has (<|endoftext|>) keeps its old id: refused, and
                # remembered as refused (None) so that asking again costs no copy
                found = (tokenizer, trigger_id) if added == 1 and trigger_id == len(base) else (None, -1)
                self._trigger_tokenizers[key] = found
                while len(self._trigger_tokenizers) > _TRIGGER_TOKENIZERS:
                    self._trigger_tokenizers.popitem(last=False)
            self._trigger_tokenizers.move_to_end(key)
        if found[0] is None:
            raise InvalidArgument("trigger_word", trigger_word,
                                  "is already a token of this model's tokenizer; use a new word (PhotoMaker: img)")
        return found

    def _identity_chunks(self, index: int, text: str, weighting: bool, trigger_word: str, repeats: int,
                         field: str) -> tuple[list[TokenChunk], list[int], list[TokenChunk]]:
        """One identity prompt on encoder `index`: the chunks with the class token repeated, the
        positions of those repeats along the encoded sequence, and the text-only chunks."""
        tokenizer, trigger_id = self._trigger_tokenizer(index, trigger_word)
        parsed = parse_prompt_weights(text) if weighting else [(text, 1.0)]
        identity = expand_trigger(token_stream(tokenizer, parsed), trigger_id, repeats,
                                  trigger_word=trigger_word, field=field)
        repeated, positions = chunk_tokens(tokenizer, identity.repeated, identity.class_indices)
        text_only, _ = chunk_tokens(tokenizer, identity.text_only)
        return repeated, positions, text_only

    # -- one prompt through one encoder -------------------------------------------------------
    def _run(self, index: int, chunks: list[TokenChunk], clip_skip: int | None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states [1, 77 * len(chunks), D] of one prompt on encoder `index` (weighted, every
        window encoded alone and concatenated along the sequence), and for SDXL's projection
        encoder the pooled embedding [1, P] of the first window."""
        tokenizer, encoder = self.tokenizers[index], self.encoders[index]
        windows = [window_ids(tokenizer, chunk) for chunk in chunks]
        ids = torch.tensor([w[0] for w in windows], dtype=torch.long, device=self.device)
        weights = torch.tensor([w[1] for w in windows], dtype=torch.float32)
        if self.is_sdxl:  # diffusers' SDXL encode_prompt passes no attention mask
            out = encoder(ids, output_hidden_states=True)
            pooled = out[0][:1] if out[0].ndim == 2 else None  # text_embeds of the projection encoder
            hidden = out.hidden_states[-2 if clip_skip is None else -(clip_skip + 2)]
        else:
            mask = None
            if getattr(encoder.config, "use_attention_mask", False):
                mask = torch.tensor([w[2] for w in windows], dtype=torch.long, device=self.device)
            pooled = None
            if clip_skip is None:
                hidden = encoder(ids, attention_mask=mask)[0]
            else:
                out = encoder(ids, attention_mask=mask, output_hidden_states=True)
                # transformers 5 flattened CLIPTextModel (no .text_model); diffusers 0.42.1 still
                # reads text_encoder.text_model and fails (huggingface/diffusers#14124)
                final_layer_norm = getattr(encoder, "text_model", encoder).final_layer_norm
                hidden = final_layer_norm(out.hidden_states[-(clip_skip + 1)])
        if bool((weights != 1.0).any()):
            hidden = apply_weights(hidden, weights)
        return hidden.reshape(1, -1, hidden.shape[-1]), pooled

    def _check(self, prompt_2: str | None, negative_prompt_2: str | None, clip_skip: int | None) -> None:
        if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int)
                                      or not 0 <= clip_skip <= self.max_clip_skip):
            raise InvalidArgument("clip_skip", clip_skip,
                                  f"must be an integer from 0 to {self.max_clip_skip} for this model")
        if not self.is_sdxl:
            for name, value in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)):
                if value:
                    raise InvalidArgument(name, value, "only SDXL models have a second text encoder")

    @torch.inference_mode()
    def encode(self, prompt: str, negative_prompt: str | None, with_negative: bool, *,
               prompt_2: str | None = None, negative_prompt_2: str | None = None,
               clip_skip: int | None = None, weighting: bool = True,
               max_windows: int | None = None, trigger_word: str | None = None,
               class_word_repeats: int | None = None) -> PromptEmbeddings:
        """prompt_embeds [1, 77k, D] (+ negative of the same shape when with_negative; + pooled [1, P]
        for SDXL). k is the number of 75-token windows of the longest of the prompts encoded;
        shorter ones are padded with windows of the empty prompt so that CFG can batch them.

        SDXL: prompt_2 / negative_prompt_2 go to tokenizer_2 / text_encoder_2; empty or None means
        the same as prompt / negative_prompt (diffusers' `or`). With force_zeros_for_empty_prompt, a
        negative_prompt of None gives all-zero negatives (whatever negative_prompt_2 is), as diffusers.
        clip_skip: None = the pipeline default; k >= 0 reads hidden_states[-(k+1)] + final layer
        norm (SD 1.x) / hidden_states[-(k+2)] (SDXL), as diffusers' encode_prompt does for the
        prompt; unlike diffusers (which ignores it there) it applies to the negative prompt too.
        weighting=False takes the texts literally (no attention syntax, no BREAK); long prompts are
        still windowed. max_windows: a prompt taking more windows is an InvalidArgument naming it
        (the encoder's and the denoiser's cost grow with the windows, not with the characters).

        trigger_word (PhotoMaker V2's identity prompts, see check_identity / expand_trigger): the
        prompt (and prompt_2, SDXL) is tokenised with the trigger as an extra special token; it
        must hold it exactly once, right after its class word ("a photo of a woman img"). The
        trigger is removed and the class word's last token repeated to class_word_repeats copies
        in all (with its weight), which prompt_embeds / pooled_prompt_embeds encode;
        class_token_positions are those copies' indices along prompt_embeds' seq axis (a BOS opens
        every 77-token window, so window w's token j is at 77w + 1 + j). text_only_prompt_embeds /
        text_only_pooled_prompt_embeds encode the prompt without the trigger, class word once. The
        negative prompt is encoded as always (the trigger is plain text there). Every embedding
        returned has the same k windows."""
        self._check(prompt_2, negative_prompt_2, clip_skip)
        identity = check_identity(trigger_word, class_word_repeats)
        # texts[p][e]: prompt p (0 positive, 1 negative) on encoder e
        texts = [[prompt, prompt_2 or prompt] if self.is_sdxl else [prompt]]
        names = [["prompt", "prompt_2"]]
        zero_negative = (with_negative and self.is_sdxl and negative_prompt is None
                         and self.force_zeros_for_empty_prompt)
        if with_negative and not zero_negative:
            negative = negative_prompt or ""
            texts.append([negative, negative_prompt_2 or negative] if self.is_sdxl else [negative])
            names.append(["negative_prompt", "negative_prompt_2"])
        positions: list[int] = []
        if identity:
            # the second encoder reads prompt_2 only when one is given (else the same prompt)
            fields = ["prompt", "prompt_2" if prompt_2 else "prompt"]
            rows = [self._identity_chunks(e, text, weighting, trigger_word, class_word_repeats, fields[e])
                    for e, text in enumerate(texts[0])]
            positions = rows[0][1]
            if any(row[1] != positions for row in rows[1:]):
                raise InvalidArgument("prompt_2", "class tokens at other positions than the prompt's",
                                      "with trigger_word, prompt_2 needs its trigger word at the same token "
                                      "position as the prompt (or leave prompt_2 empty)")
            chunks = [[row[0] for row in rows]]
            chunks += [[self._chunks(self.tokenizers[e], text, weighting) for e, text in enumerate(row)]
                       for row in texts[1:]]
            chunks.append([row[2] for row in rows])   # the text-only prompt, last
            names.append(names[0])
        else:
            chunks = [[self._chunks(self.tokenizers[e], text, weighting) for e, text in enumerate(row)]
                      for row in texts]
        count = max(len(c) for row in chunks for c in row)
        if max_windows is not None and count > max_windows:
            windows, name = max((len(c), names[p][e]) for p, row in enumerate(chunks) for e, c in enumerate(row))
            raise InvalidArgument(name, f"{windows} windows of 75 tokens",
                                  f"at most {max_windows} windows (BREAK starts one too)")
        results = []
        for row in chunks:
            hidden, pooled = [], None
            for e, c in enumerate(row):
                h, p = self._run(e, c + [TokenChunk() for _ in range(count - len(c))], clip_skip)
                hidden.append(h)
                pooled = p if p is not None else pooled
            results.append((torch.cat(hidden, dim=-1) if len(hidden) > 1 else hidden[0], pooled))
        identity_fields = {}
        if identity:
            text_only, text_only_pooled = results.pop()
            identity_fields = dict(class_token_positions=tuple(positions), text_only_prompt_embeds=text_only,
                                   text_only_pooled_prompt_embeds=text_only_pooled)
        positive, pooled = results[0]
        if not with_negative:
            return PromptEmbeddings(positive, None, pooled, **identity_fields)
        if zero_negative:
            return PromptEmbeddings(positive, torch.zeros_like(positive), pooled, torch.zeros_like(pooled),
                                    **identity_fields)
        negative, negative_pooled = results[1]
        return PromptEmbeddings(positive, negative, pooled, negative_pooled, **identity_fields)


def embeddings_bytes(value: PromptEmbeddings) -> int:
    """Bytes the tensors of one encoded prompt hold."""
    tensors = (value.prompt_embeds, value.negative_prompt_embeds, value.pooled_prompt_embeds,
               value.negative_pooled_prompt_embeds, value.text_only_prompt_embeds,
               value.text_only_pooled_prompt_embeds)
    return sum(t.element_size() * t.nelement() for t in tensors if t is not None)


class EmbeddingCache:
    """LRU of encoded prompts, keyed by model id and prompt digests (never the prompt text),
    bounded by entries and by bytes: the oldest entries go until both bounds hold. An entry's
    size grows with the prompt (a 4000-character prompt is ~34 MB at SDXL width), so an entry
    count alone would let callers fill tens of GB."""

    def __init__(self, capacity: int, max_bytes: int | None = None) -> None:
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[Hashable, tuple[PromptEmbeddings, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> PromptEmbeddings | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: PromptEmbeddings) -> None:
        size = embeddings_bytes(value)
        if self._capacity <= 0 or (self._max_bytes is not None and size > self._max_bytes):
            return  # an entry larger than the whole cache would only evict everything else
        with self._lock:
            previous = self._items.pop(key, None)
            if previous is not None:
                self._bytes -= previous[1]
            self._items[key] = (value, size)
            self._bytes += size
            while len(self._items) > self._capacity or (self._max_bytes is not None and self._bytes > self._max_bytes):
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted

    @property
    def nbytes(self) -> int:
        """Bytes the cached embeddings hold now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
