"""Text metrics of the held-out evaluation: distinct-n and base perplexity."""

from __future__ import annotations

import math
from collections.abc import Sequence


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams / all word n-grams, pooled over ``texts`` (0.0 when there are none)."""
    total, seen = 0, set()
    for t in texts:
        w = t.split()
        grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def perplexity(logprob_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """exp(-(sum of log-probs) / (number of tokens)) over all sequences; NaN when there are no tokens."""
    n = sum(token_counts)
    return math.exp(-sum(logprob_sums) / n) if n else float("nan")
