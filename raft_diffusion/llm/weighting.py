"""Loss weights of a stage's kept completions: what fine-tuning should learn more or less of.

RAFT fine-tunes on the completions it kept, each with weight 1, so the kept set's own proportions are what the
model learns. Those proportions come from the current model, which after a few stages over-produces one stock
phrase for every prompt ("a gem ." on the toy text world), so the next kept set holds even more of it. Two
weights counter that, both still a supervised loss over kept completions (nothing outside the kept set is
trained on, nothing is pushed down):

- base importance (``train.base_importance`` a): ``(p_base / p_theta) ** a`` per completion. At a = 1 the
  weighted kept set is a sample of the base model conditioned on the ranking (self-normalised importance
  sampling), as varied as the base; smaller a tempers it.
- crowding (``train.crowding_power`` g): ``crowding ** -g``, where a completion's crowding is the mean, over its
  distinct word bigrams, of the share of the stage's kept completions (all prompts) that contain that bigram.
  A phrase kept for every prompt has crowding near 1; one written once in the stage near 1/N.

The product is normalised to mean 1 over the kept set, then capped at ``train.weight_max`` (in units of the
mean), so one rare completion cannot take the whole step; after the cap the mean is <= 1.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from .metrics import _ngrams


def crowding(texts: Sequence[str], n: int = 2) -> list[float]:
    """Per text, the mean over its distinct word n-grams of (number of ``texts`` containing it) / len(texts).

    A text with no word n-gram gets 1.0 (the most crowded: it adds no new n-gram)."""
    grams = [set(_ngrams(t, n)) for t in texts]
    df = Counter(g for gs in grams for g in gs)
    total = len(texts)
    return [sum(df[g] for g in gs) / (len(gs) * total) if gs else 1.0 for gs in grams]


def kept_weights(
    texts: Sequence[str],
    log_ratios: Sequence[float | None],
    *,
    base_importance: float = 0.0,
    crowding_power: float = 0.0,
    weight_max: float | None = None,
) -> list[float] | None:
    """The loss weight of each kept completion (see the module doc); None when both weightings are off."""
    if not base_importance and not crowding_power:
        return None
    if not texts:
        return []
    logw = [0.0] * len(texts)
    if base_importance:
        if any(x is None for x in log_ratios):
            raise ValueError("train.base_importance needs each kept completion's log p/p_base")
        logw = [w - base_importance * float(x) for w, x in zip(logw, log_ratios)]
    if crowding_power:
        logw = [w - crowding_power * math.log(c) for w, c in zip(logw, crowding(texts))]
    top = max(logw)
    e = [math.exp(v - top) for v in logw]  # shifted by the largest exponent: no overflow, same ratios
    scale = len(e) / sum(e)
    return [min(v * scale, weight_max) if weight_max is not None else v * scale for v in e]


def effective_size(weights: Sequence[float]) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2: len(weights) for equal weights, 1 when one dominates."""
    sq = sum(w * w for w in weights)
    return sum(weights) ** 2 / sq if sq else 0.0
