"""Text normalisation for the prompt policy's lexical rules (and the encoder's input).

People evade word lists with look-alike characters, so the forms compared are built to undo the
common tricks:

- `deobfuscate(text)`: characters only. Unicode NFKC (fullwidth and styled letters become plain
  ones), format characters (category Cf: zero-width space and joiners, BOM, soft hyphen) removed,
  casefold, accents stripped (NFKD then combining marks dropped), Cyrillic/Greek/small-capital
  look-alikes mapped to the Latin letter they imitate, and leetspeak digits and symbols mapped to
  letters inside tokens that also hold a letter ("nud3", "$ex", "h@te"). A bare number ("18",
  "1920") stays a number, and so does a leading number of two or more digits ("12yo", "35mm").
  Words and punctuation stay, so the sentence encoder still reads a sentence.
- `normalize(text)`: deobfuscated, punctuation, symbols and separators turned into spaces,
  whitespace collapsed: the form lexical terms match on word boundaries.
- `squash(text)`: normalised with every space removed, so "n u d e" and "n.u.d.e" read "nude".
- `readable(text)`: deobfuscated with letter-by-letter spellings joined: the encoder's input.

Matching a term (`TermMatcher`): on the normalised text on word boundaries, or on the squashed text
where its letters run exactly over whole consecutive words. The trade-off: substring matching on
squashed text catches spaced-out words but also fires across and inside innocent words
("therapist" holds "rapist", "pen island" holds "penis"). Requiring the squashed match to start and
end on word boundaries rules out the inside-a-word cases. Terms of at least SQUASH_MIN_LETTERS
letters may then run over any whole words ("deep fake", "de cap itated"); shorter terms are too
easily spelled by adjacent short words ("go re-enter" spells "gore"), so they match the squashed
form only when spelled out one letter per word ("n u d e", "g-o-r-e"). The look-alike mapping in
turn makes real Cyrillic or Greek text unreadable to lexical terms, which are English; the
semantic check reads the deobfuscated text too.

A term rule (`parse_rule`) combines terms: "a | b" matches either, "x & y" needs both anywhere in
the text ("naked | nude & child | kid").

"1" reads "i" or "l" in leetspeak ("k1ll", "b1ood"): `normalized_forms` gives both readings and a
term matches if it matches either.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable

# Terms this long or longer (letters) may also match the squashed form.
SQUASH_MIN_LETTERS = 5

# Capital look-alikes, mapped before casefold: some fold onto a lowercase letter that imitates
# another Latin letter (Greek capital nu "Ν" imitates N, its lowercase "ν" imitates v).
_CAPITAL_HOMOGLYPHS = {
    # Cyrillic
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C",
    "Т": "T", "У": "Y", "Х": "X", "І": "I", "Ј": "J", "Ѕ": "S",
    # Greek
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N",
    "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
}
_CAPITAL_HOMOGLYPH_TABLE = str.maketrans(_CAPITAL_HOMOGLYPHS)

# Lowercase look-alikes, as they are after casefold.
_HOMOGLYPHS = {
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "з": "3", "к": "k", "м": "m", "н": "h", "о": "o",
    "п": "n", "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ь": "b", "і": "i", "ї": "i",
    "ј": "j", "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w", "һ": "h", "ӏ": "l",
    # Greek
    "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o",
    "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ς": "c",
    # Latin small capitals and other look-alikes NFKC leaves alone
    "ᴀ": "a", "ʙ": "b", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ɢ": "g", "ʜ": "h", "ɪ": "i", "ᴊ": "j",
    "ᴋ": "k", "ʟ": "l", "ᴍ": "m", "ɴ": "n", "ᴏ": "o", "ᴘ": "p", "ʀ": "r", "ꜱ": "s", "ᴛ": "t",
    "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ʏ": "y", "ᴢ": "z", "ı": "i", "ɑ": "a", "ɡ": "g", "ℓ": "l",
}
_HOMOGLYPH_TABLE = str.maketrans(_HOMOGLYPHS)

# Leetspeak, applied only inside tokens that hold a letter; "1" is resolved per reading.
_LEET = {"0": "o", "3": "e", "4": "a", "5": "s", "6": "g", "7": "t", "8": "b", "9": "g",
         "@": "a", "$": "s", "!": "i", "|": "l", "+": "t", "€": "e", "£": "l"}
_LEET_CHARS = set(_LEET) | {"1"}
_TOKEN = re.compile(r"\S+")
# A trailing "!" or "|" is punctuation ("wow!"), not a letter.
_TRAILING_PUNCT = re.compile(r"[!|]+$")
_LEADING_NUMBER = re.compile(r"\d{2,}")


def _strip_format_and_accents(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    text = unicodedata.normalize("NFKD", text.translate(_CAPITAL_HOMOGLYPH_TABLE).casefold())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return unicodedata.normalize("NFC", text).translate(_HOMOGLYPH_TABLE)


def _unleet_token(token: str, one_as: str) -> str:
    if not any(ch.isalpha() for ch in token) or not any(ch in _LEET_CHARS for ch in token):
        return token
    # A token that starts with a number of two or more digits is a quantity with its unit
    # ("12yo", "35mm", "1990s"): the number stays.
    number = _LEADING_NUMBER.match(token)
    head, token = (number.group(), token[number.end():]) if number else ("", token)
    trailing = _TRAILING_PUNCT.search(token)
    body, tail = (token[:trailing.start()], trailing.group()) if trailing else (token, "")
    return head + "".join(one_as if ch == "1" else _LEET.get(ch, ch) for ch in body) + tail


def deobfuscate(text: str, one_as: str = "i") -> str:
    """Look-alike characters undone, words and punctuation kept (see the module doc)."""
    text = _strip_format_and_accents(text)
    return _TOKEN.sub(lambda match: _unleet_token(match.group(), one_as), text)


# A word spelled out one letter at a time with one kind of separator: "n u d e", "g-o-r-e", "n.u.d.e".
_SPELLED_OUT = re.compile(r"(?<![^\W\d_])[^\W\d_](?P<sep>[ .\-_*·])[^\W\d_](?:(?P=sep)[^\W\d_])+(?![^\W\d_])")


def readable(text: str) -> str:
    """What the sentence encoder reads: `deobfuscate(text)` with words spelled out letter by
    letter joined back ("d-e-a-d" -> "dead"), since the encoder cannot read them spelled out."""
    return _SPELLED_OUT.sub(lambda match: match.group().replace(match.group("sep"), ""), deobfuscate(text))


def _spaces_for_punctuation(text: str) -> str:
    # Punctuation (P*), symbols (S*), separators (Z*) and controls become spaces; letters,
    # digits and marks stay.
    return "".join(" " if unicodedata.category(ch)[0] in "PSZC" else ch for ch in text)


def normalize(text: str, one_as: str = "i") -> str:
    """The form lexical terms match on word boundaries: deobfuscated, lower-case words of letters
    and digits separated by single spaces."""
    return " ".join(_spaces_for_punctuation(deobfuscate(text, one_as)).split())


def squash(text: str, one_as: str = "i") -> str:
    """`normalize(text)` with all spaces removed: "n u d e" and "n.u.d.e" become "nude"."""
    return normalize(text, one_as).replace(" ", "")


def normalized_forms(text: str) -> tuple[str, ...]:
    """The normalised readings of `text`: "1" as "i", and also as "l" where that differs."""
    forms = [normalize(text, "i")]
    if "1" in text:
        as_l = normalize(text, "l")
        if as_l != forms[0]:
            forms.append(as_l)
    return tuple(forms)


@dataclass(frozen=True)
class _Term:
    pattern: re.Pattern[str]  # the normalised term on word boundaries
    squashed: str             # the term without spaces
    spelled_only: bool        # too short to match over whole words: squashed only if spelled letter by letter


def _compile_term(term: str) -> _Term:
    words = normalize(term)
    if not words:
        raise ValueError(f"term part {term.strip()!r} normalises to nothing")
    squashed = words.replace(" ", "")
    return _Term(re.compile(r"(?<!\S)" + re.escape(words) + r"(?!\S)"), squashed,
                 sum(ch.isalpha() for ch in squashed) < SQUASH_MIN_LETTERS)


class _Form:
    """One normalised reading of a text, with its squashed form and word offsets in it."""

    def __init__(self, normalized: str) -> None:
        self.normalized = normalized
        self.words = normalized.split(" ")
        self.squashed = "".join(self.words)
        self.starts: dict[int, int] = {}   # squashed offset where a word starts -> the word's index
        self.ends: set[int] = set()        # squashed offsets where a word ends
        offset = 0
        for index, word in enumerate(self.words):
            self.starts[offset] = index
            offset += len(word)
            self.ends.add(offset)

    def holds(self, term: _Term) -> bool:
        if term.pattern.search(self.normalized):
            return True
        length = len(term.squashed)
        start = self.squashed.find(term.squashed)
        while start >= 0:
            if start in self.starts and start + length in self.ends:
                first = self.starts[start]
                if not term.spelled_only or all(len(word) == 1 for word in self.words[first:first + length]):
                    return True
            start = self.squashed.find(term.squashed, start + 1)
        return False


def parse_rule(rule: str) -> tuple[tuple[str, ...], ...]:
    """A term rule's parts: "A | B & C" is ((A, B), (C,)): A or B, and C, anywhere in the text.
    A plain term is one part with one alternative."""
    return tuple(tuple(alternative.strip() for alternative in part.split("|")) for part in rule.split("&"))


class TermMatcher:
    """Whether a text holds any of a list of term rules (see `parse_rule`, and the module doc for
    how one term matches)."""

    def __init__(self, rules: Iterable[str]) -> None:
        self._rules = tuple(tuple(tuple(_compile_term(alternative) for alternative in part)
                                  for part in parse_rule(rule)) for rule in rules)

    def matches(self, text: str) -> bool:
        if not self._rules:
            return False
        forms = [_Form(form) for form in normalized_forms(text)]
        # A part may match in one reading of "1" and another part in the other.
        return any(all(any(form.holds(term) for form in forms for term in part) for part in rule)
                   for rule in self._rules)
