"""The real CLIP BPE tokenizer files, derived from the vocabulary the open_clip_torch wheel ships.

The tiny model set has random weights, but its tokenizer must be the real one so that prompt
handling (weighting, >77-token chunking, trigger-word lookup) behaves exactly as in production.
No network is available, so the Hugging Face ``vocab.json`` / ``merges.txt`` pair is rebuilt from
``open_clip/bpe_simple_vocab_16e6.txt.gz`` with the same construction open_clip and OpenAI use.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
VOCAB_SIZE = 49408
# The file has ~262k merges; CLIP uses only the first 49152 - 256 - 2 of them, which is what makes
# the vocabulary exactly 49408 = 2*256 bytes + 48894 merges + 2 special tokens.
_NUM_MERGES = 49152 - 256 - 2


class ClipVocabError(RuntimeError):
    """The CLIP BPE vocabulary could not be located or read."""


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode char, the reversible mapping GPT-2/CLIP BPE is defined over.

    Printable latin-1 bytes map to themselves; the rest are shifted past 255 so that no token
    contains whitespace or control characters. The insertion order defines the first 256 ids.
    """
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def find_bpe_vocab() -> Path:
    """Path of the gzipped BPE merges inside the installed open_clip_torch package.

    ``find_spec`` locates the package without executing it: importing open_clip pulls in
    torchvision, which has no CPU wheel here.
    """
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError) as exc:  # a broken parent package, or a bogus __spec__
        raise ClipVocabError(f"cannot locate the open_clip package: {exc}") from exc
    if spec is None or not spec.submodule_search_locations:
        raise ClipVocabError(
            "open_clip_torch is not installed; it ships the CLIP BPE vocabulary "
            f"({VOCAB_FILE_NAME}) needed to build the tokenizer "
            "(pip install --no-deps open_clip_torch)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / VOCAB_FILE_NAME
        if candidate.is_file():
            return candidate
    raise ClipVocabError(
        f"{VOCAB_FILE_NAME} not found in the open_clip package at "
        f"{list(spec.submodule_search_locations)}"
    )


@lru_cache(maxsize=1)
def _load_merges() -> tuple[str, ...]:
    path = find_bpe_vocab()
    try:
        text = gzip.open(path).read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ClipVocabError(f"cannot read CLIP BPE vocabulary {path}: {exc}") from exc
    lines = text.split("\n")
    # Line 0 is a version header; merges are "a b" pairs.
    merges = lines[1 : _NUM_MERGES + 1]
    if len(merges) != _NUM_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ClipVocabError(f"unexpected content in CLIP BPE vocabulary {path}")
    return tuple(merges)


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The CLIP token -> id map (49408 entries) and the ordered merge list."""
    merges = list(_load_merges())
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split(" ")) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:  # duplicates would silently shift ids
        raise ClipVocabError(f"derived CLIP vocabulary has {len(vocab)} entries, not {VOCAB_SIZE}")
    return vocab, merges


def write_clip_tokenizer(dir: Path, pad_token: str = EOS_TOKEN) -> Path:
    """Write a Hugging Face CLIPTokenizer directory (loadable with ``from_pretrained``).

    SD 1.x pads with ``<|endoftext|>``; SDXL's second tokenizer pads with ``!``.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    if pad_token not in vocab:
        raise ClipVocabError(f"pad token {pad_token!r} is not in the CLIP vocabulary")

    # sort_keys=False keeps id order, so the file is stable and diff-friendly across builds.
    (dir / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8"
    )
    (dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        # Without it transformers assumes an effectively infinite length and never truncates.
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": True,
        **special,
    }
    (dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    (dir / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return dir
