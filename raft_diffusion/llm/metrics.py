"""Text metrics of the held-out evaluation: distinct-n (pooled and per prompt), repeated n-grams, base perplexity."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    w = text.split()
    return [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams / all word n-grams, pooled over ``texts`` (0.0 when there are none).

    The pooled figure falls as more texts are drawn (every new text repeats more of the old n-grams), so it
    compares runs only at the same number of completions; :func:`distinct_n_per_prompt` does not.
    """
    total, seen = 0, set()
    for t in texts:
        grams = _ngrams(t, n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def distinct_n_per_prompt(groups: Sequence[Sequence[str]], n: int) -> float:
    """Mean over prompts of distinct-n among that prompt's completions (each group = one prompt's K texts).

    A prompt whose completions hold no n-gram at all counts as 0 (nothing distinct was written). NaN when
    there are no groups.
    """
    groups = [g for g in groups if len(g)]
    return sum(distinct_n(g, n) for g in groups) / len(groups) if groups else float("nan")


def repeated_ngram_rate(texts: Sequence[str], n: int = 2) -> float:
    """Share of word n-grams that repeat an n-gram earlier in the same completion, over all completions.

    ``sum(total - unique) / sum(total)`` with the counts taken per completion ("a gem was a gem" has 4
    bigrams, 1 of them a repeat: 0.25). 0.0 when no completion has an n-gram.
    """
    total = repeats = 0
    for t in texts:
        grams = _ngrams(t, n)
        total += len(grams)
        repeats += len(grams) - len(set(grams))
    return repeats / total if total else 0.0


def perplexity(logprob_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """exp(-(sum of log-probs) / (number of tokens)) over all sequences; NaN when there are no tokens."""
    n = sum(token_counts)
    return math.exp(-sum(logprob_sums) / n) if n else float("nan")


def ngram_embedding(text: str, dim: int = 512) -> list[float]:
    """Word unigram and bigram counts hashed (crc32) into ``dim`` buckets: the vector whose cosine distance
    ``ranking.diversity_weight`` / ``novelty_weight`` spread an LLM's kept completions in. Two texts with no
    word n-gram in common are at distance 1 (but for hash collisions); a text with no words is the zero vector
    (distance 1 to every text)."""
    vec = [0.0] * dim
    for n in (1, 2):
        for gram in _ngrams(text, n):
            vec[zlib.crc32(" ".join(gram).encode()) % dim] += 1.0
    return vec
