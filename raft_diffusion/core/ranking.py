"""Which samples RAFT keeps.

Three modes over one total order:
- ``local``: the best ``top_k`` of each prompt (RAFT's default: per-prompt best-of-K),
- ``global``: the best ``top_ratio`` of all samples of the stage,
- ``threshold``: every sample whose key is at least ``threshold``,
optionally followed by ``max_kept`` (the best N of what the mode selected).

The ranking key is the reward, or ``reward - beta * log(p_theta / p_base)`` when ``kl_beta > 0``
and the generator supplied the log-ratio. NaN keys are never selected. Ties break towards the
lower prompt index, then the lower sample index, so selections are deterministic.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from .types import Sample

MODES = ("local", "global", "threshold")


def ranking_key(reward: float, log_ratio: float | None, kl_beta: float) -> float:
    """``r - beta * log(p_theta/p_base)``; plain reward when beta is 0 or the log-ratio is unknown."""
    if kl_beta and log_ratio is not None:
        return float(reward) - kl_beta * float(log_ratio)
    return float(reward)


def order_key(key: float, prompt_index: int, sample_index: int) -> tuple:
    """Sort key, larger is better: the ranking key, then lower prompt, then lower sample index."""
    return (key, -prompt_index, -sample_index)


def is_nan(x: float) -> bool:
    return x != x


def global_count(total: int, top_ratio: float) -> int:
    """How many samples ``global`` mode keeps out of ``total``: ceil(ratio * total), at least 1."""
    return max(1, math.ceil(top_ratio * total - 1e-9)) if total else 0


def select(
    keys: Sequence[float],
    prompt_indices: Sequence[int],
    sample_indices: Sequence[int],
    *,
    mode: str,
    top_k: int = 1,
    top_ratio: float = 0.1,
    threshold: float = 0.0,
    max_kept: int | None = None,
) -> list[int]:
    """Reference (non-streaming) selection: indices of kept items, best first."""
    if mode not in MODES:
        raise ValueError(f"unknown ranking mode {mode!r}; choose one of {', '.join(MODES)}")
    valid = [i for i, k in enumerate(keys) if not is_nan(k)]
    best_first = sorted(valid, key=lambda i: order_key(keys[i], prompt_indices[i], sample_indices[i]), reverse=True)
    if mode == "local":
        taken: dict[int, int] = {}
        chosen = []
        for i in best_first:
            p = prompt_indices[i]
            if taken.get(p, 0) < top_k:
                taken[p] = taken.get(p, 0) + 1
                chosen.append(i)
    elif mode == "global":
        chosen = best_first[: global_count(len(keys), top_ratio)]
    else:
        chosen = [i for i in best_first if keys[i] >= threshold]
    if max_kept is not None:
        chosen = chosen[:max_kept]
    return chosen


def select_samples(samples: Sequence[Sample], ranking) -> list[Sample]:
    """Apply a :class:`RankingConfig`-like object to samples (reference path; the pool streams)."""
    keys = [ranking_key(s.reward, s.log_ratio, ranking.kl_beta) for s in samples]
    idx = select(
        keys,
        [s.prompt_index for s in samples],
        [s.sample_index for s in samples],
        mode=ranking.mode,
        top_k=ranking.top_k,
        top_ratio=ranking.top_ratio,
        threshold=ranking.threshold,
        max_kept=ranking.max_kept,
    )
    return [samples[i] for i in idx]
