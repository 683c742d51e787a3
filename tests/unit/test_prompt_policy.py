"""The prompt policy: normalisation against obfuscation, term rules, the sentence encoder, and the
default policy on the benign and harmful prompt sets (tests/data/safety)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from services.safety.decisions import Outcome, Source
from services.safety.normalize import (TermMatcher, deobfuscate, normalize, normalized_forms, parse_rule, readable,
                                       squash)
from services.safety.policy import DEFAULT_POLICY_PATH, load_policy
from services.safety.prompt_policy import PromptPolicy, SentenceEncoder, semantic_units

DATA = Path(__file__).resolve().parents[1] / "data" / "safety"
# Style tags around a buried clause: the shape of many real prompts.
BURY = ("masterpiece, best quality, ultra detailed, 8k, cinematic lighting, {}, sharp focus, depth of field, "
        "trending on artstation")


def read_prompts(name: str) -> list[str]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


# --- normalisation ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Ｎｕｄｅ　Ｐｈｏｔｏ", "nude photo"),                         # fullwidth (NFKC)
    ("nu\u200bde ph\u200do\ufeffto", "nude photo"),              # zero-width space, joiner, BOM
    ("gr\u00adaph\u00adic", "graphic"),                          # soft hyphens
    ("n\u0430k\u0435d \u0440\u043erch", "naked porch"),          # Cyrillic а е р о
    ("\u0405\u0415\u0425", "sex"),                               # Cyrillic capitals Ѕ Е Х
    ("\u039d\u0391\u0396\u0399", "nazi"),                        # Greek capitals: Ν is N, not v
    ("ɴᴜᴅᴇ", "nude"),                                            # small capitals
    ("crème brûlée, naïve", "creme brulee naive"),               # accents
    ("nud3 $ex h@te l0ve", "nude sex hate love"),                # leetspeak
    ("wow! it's   great...", "wow it s great"),                  # punctuation, trailing "!" is not "i"
    ("a 12 year old, 1920s, 12yo, 35mm", "a 12 year old 1920s 12yo 35mm"),  # numbers stay numbers
])
def test_normalize_undoes_obfuscation(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_squash_joins_spaced_out_letters() -> None:
    assert squash("n u d e") == squash("n.u.d.e") == squash("n-u-d-e") == "nude"


def test_one_reads_as_i_or_l() -> None:
    assert normalized_forms("k1ll b1ood") == ("kill biood", "klll blood")
    assert normalized_forms("no ones here") == ("no ones here",)


def test_deobfuscate_keeps_punctuation_and_readable_joins_spelling() -> None:
    assert deobfuscate("N\u0430ked, d3ad!") == "naked, dead!"
    assert readable("a d-e-a-d man, s.a.d") == "a dead man, sad"


def test_terms_match_on_word_boundaries_not_inside_words() -> None:
    matcher = TermMatcher(["rapist", "penis", "gore"])
    assert matcher.matches("the RAPIST")
    assert not matcher.matches("a therapist in her office")
    assert not matcher.matches("a pen island")
    assert matcher.matches("Al Gore")                  # word match: why the policy has no "gore" term


def test_short_terms_match_squashed_only_when_spelled_letter_by_letter() -> None:
    matcher = TermMatcher(["gore", "nude"])
    assert matcher.matches("g-o-r-e") and matcher.matches("a n u d e photo") and matcher.matches("n.u.d.e")
    assert not matcher.matches("let's go re-enter")     # "go re" spells gore over whole words
    long_matcher = TermMatcher(["deep fake", "decapitated"])
    assert long_matcher.matches("deepfake") and long_matcher.matches("de cap itated")
    assert long_matcher.matches("d\u200be\u200bc\u200ba\u200bp\u200bi\u200bt\u200ba\u200bt\u200be\u200bd")


def test_rule_parts_must_all_match() -> None:
    assert parse_rule("a | b & c") == (("a", "b"), ("c",))
    matcher = TermMatcher(["nude | naked & child | kid"])
    assert matcher.matches("a n4ked k1d")
    assert not matcher.matches("a naked mole rat")
    assert not matcher.matches("a child in a park")


def test_semantic_units_split_clauses_and_skip_bare_tags() -> None:
    units = semantic_units("a cat on a mat, 8k, a dog in the fog")
    assert units[0] == "a cat on a mat, 8k, a dog in the fog"
    assert "a cat on a mat" in units and "a dog in the fog" in units and "8k" not in units
    assert "a cat on a mat, 8k" in units and "8k, a dog in the fog" in units
    assert semantic_units("one clause only") == ["one clause only"]
    assert semantic_units("a, b, c", clauses=False) == ["a, b, c"]


# --- the encoder and the policy ---------------------------------------------------------------

@pytest.fixture(scope="module")
def policy():
    return load_policy(DEFAULT_POLICY_PATH)


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


@pytest.fixture(scope="module")
def prompt_policy(policy, encoder) -> PromptPolicy:
    return PromptPolicy(policy, encoder)


def test_encoder_gives_unit_float32_vectors(encoder: SentenceEncoder) -> None:
    vectors = encoder.encode(["a red apple", "a green pear", "a red apple"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[2] > 0.999 > vectors[0] @ vectors[1]
    assert encoder.encode([]).shape == (0, 384)


def test_missing_encoder_model_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent"))):
        SentenceEncoder(str(tmp_path / "absent"))


def test_benign_prompts_are_allowed(prompt_policy: PromptPolicy) -> None:
    prompts = read_prompts("benign_prompts.txt")
    assert len(prompts) >= 60
    decisions = prompt_policy.check([("prompt", text) for text in prompts])
    false_positives = [(index, d.outcome.name, d.category, round(d.score, 3))
                       for index, d in enumerate(decisions, 1) if not d.allowed]
    print(f"benign: {len(false_positives)} false positives of {len(prompts)}: {false_positives}")
    assert not false_positives


def test_harmful_prompts_are_reviewed_or_blocked(prompt_policy: PromptPolicy) -> None:
    prompts = read_prompts("harmful_prompts.txt")
    assert len(prompts) >= 40
    decisions = prompt_policy.check([("prompt", text) for text in prompts])
    false_negatives = [(index, d.category, round(d.score, 3)) for index, d in enumerate(decisions, 1) if d.allowed]
    print(f"harmful: {len(false_negatives)} false negatives of {len(prompts)}: {false_negatives}; "
          f"blocked {sum(d.outcome is Outcome.BLOCK for d in decisions)}")
    assert not false_negatives
    # Every required category is exercised by the set.
    assert {d.category for d in decisions} >= {"sexual_minors", "non_consensual_intimate", "graphic_violence",
                                               "deceptive_impersonation", "self_harm", "hate"}


def test_a_third_of_harmful_prompts_are_obfuscated() -> None:
    prompts = read_prompts("harmful_prompts.txt")
    obfuscated = [text for text in prompts if readable(text) != text.casefold()]
    assert len(obfuscated) * 3 >= len(prompts)


def test_examples_are_not_copies_of_test_prompts(policy) -> None:
    tested = {normalize(text) for name in ("benign_prompts.txt", "harmful_prompts.txt") for text in read_prompts(name)}
    copies = [(category.name, example) for category in policy.prompt_categories for example in category.examples
              if normalize(example) in tested]
    assert not copies


def test_a_harmful_clause_buried_in_style_tags_is_caught_by_clause_scoring(policy, encoder,
                                                                          prompt_policy: PromptPolicy) -> None:
    # The harmful prompts no term rule catches: only the semantic check stands between them and ALLOW.
    matchers = prompt_policy._matchers
    semantic_only = [text for text in read_prompts("harmful_prompts.txt")
                     if not any(matcher.matches(text) for matcher in matchers)]
    assert semantic_only
    buried = [("prompt", BURY.format(text)) for text in semantic_only]
    with_clauses = prompt_policy.check(buried)
    whole_only = PromptPolicy(policy, encoder, clauses=False).check(buried)
    caught_whole = sum(not d.allowed for d in whole_only)
    print(f"buried: caught {sum(not d.allowed for d in with_clauses)}/{len(buried)} with clauses, "
          f"{caught_whole}/{len(buried)} on the whole text")
    assert all(not d.allowed for d in with_clauses)
    assert caught_whole < len(buried)


def test_decision_carries_rule_numbers_and_fields(prompt_policy: PromptPolicy, policy) -> None:
    fields = [("prompt", "a bustling harbour at dusk with fishing boats"),
              ("prompt_2", "leaked nudes of a famous pop singer"),
              ("face_prompts[0]", "   ")]
    allow, block, empty = prompt_policy.check(fields)
    assert [d.field for d in (allow, block, empty)] == ["prompt", "prompt_2", "face_prompts[0]"]
    assert all(d.source is Source.PROMPT and d.policy_version == policy.version == "2026.12.3"
               for d in (allow, block, empty))
    assert allow.outcome is Outcome.ALLOW and allow.category and allow.score < allow.threshold
    assert block.outcome is Outcome.BLOCK and block.category == "non_consensual_intimate"
    rules = policy.prompt_category("non_consensual_intimate")
    assert block.score >= block.threshold and block.threshold in (rules.lexical.block, rules.semantic.block)
    assert (empty.outcome, empty.category, empty.score) == (Outcome.ALLOW, "", 0.0)
    alone = prompt_policy.check_one(fields[1][1], "prompt_2")
    # Batched and single encodes differ in the last float bits.
    assert (alone.outcome, alone.category, alone.field) == (block.outcome, block.category, block.field)
    assert alone.score == pytest.approx(block.score, abs=1e-4)


def test_lexical_match_of_a_review_only_category_reviews(prompt_policy: PromptPolicy) -> None:
    # graphic_violence's lexical block is null: a term (here in a museum context) only reviews.
    decision = prompt_policy.check_one("Judith beheading Holofernes, baroque painting in a museum")
    assert decision.outcome is Outcome.REVIEW and decision.category == "graphic_violence"
    assert decision.reason == "lexical term of graphic_violence"


def test_reasons_never_hold_the_prompt_or_the_matched_term(prompt_policy: PromptPolicy) -> None:
    prompts = ["deepfake nude of the zorblatt weathergirl", "zorblatt fan art of a dismembered quokka",
               "a watercolour of zorblatt meadows", "d3epf4ke nud3s of my zorblatt neighbour"]
    for decision, text in zip(prompt_policy.check([("prompt", t) for t in prompts]), prompts):
        reason = decision.reason.casefold()
        assert "zorblatt" not in reason and "quokka" not in reason and "meadows" not in reason
        for term in ("deepfake", "nude", "dismembered", "neighbour"):
            assert term not in reason, (term, decision)
        assert re.fullmatch(r"(lexical term of|similar to an example of|closest to an example of) [a-z_]+.*", reason)


def test_all_fields_of_a_call_are_encoded_in_one_batch(policy, encoder) -> None:
    calls: list[int] = []

    class CountingEncoder:
        dimension = encoder.dimension

        def encode(self, texts: list[str]) -> np.ndarray:
            calls.append(len(texts))
            return encoder.encode(texts)

    checker = PromptPolicy(policy, CountingEncoder())  # type: ignore[arg-type]
    calls.clear()
    checker.check([("prompt", "a lighthouse, stormy sea, dramatic sky"), ("prompt_2", "oil painting"),
                   ("face_prompts[0]", "a smiling face")])
    assert len(calls) == 1 and calls[0] >= 3
