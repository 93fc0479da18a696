"""Text metrics of the held-out evaluation: distinct-n, base perplexity, best-of-K."""
from __future__ import annotations

import math
from collections.abc import Sequence


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams / all word n-grams, pooled over ``texts`` (0.0 when there are none)."""
    total, seen = 0, set()
    for t in texts:
        w = t.split()
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def perplexity(logprob_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """exp(-(sum of log-probs) / (number of tokens)) over all sequences; NaN when there are no tokens."""
    n = sum(token_counts)
    return math.exp(-sum(logprob_sums) / n) if n else float("nan")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std of the finite values (NaN, NaN when none)."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    return m, (sum((x - m) ** 2 for x in v) / len(v)) ** 0.5


def best_of_k(rewards_by_prompt: dict[int, list[float]]) -> float:
    """Mean over prompts of the best finite reward among each prompt's samples."""
    bests = [max(x for x in rs if not math.isnan(x)) for rs in rewards_by_prompt.values() if any(not math.isnan(x) for x in rs)]
    return sum(bests) / len(bests) if bests else float("nan")
