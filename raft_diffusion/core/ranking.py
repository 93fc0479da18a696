"""Which samples RAFT keeps.

Three modes over one total order:
- ``local``: the best ``top_k`` of each prompt (RAFT's default: per-prompt best-of-K),
- ``global``: the best ``top_ratio`` of all samples of the stage,
- ``threshold``: every sample whose key is at least ``threshold``,
optionally followed by ``max_kept`` (the best N of what the mode selected).

A threshold can rise with the pool (``threshold_quantile`` q, read when a ranking config has it): the stage's
cut is then the q-quantile of the stage's valid keys, never below ``threshold`` and never above
``threshold_max``. Early stages keep what reaches ``threshold``; as the model improves the cut follows its
pool up; at ``threshold_max`` it stops rising, so the kept set is again "the model's own samples above a fixed
bar", whose exact fit would be the model conditioned on the bar, not its single best mode (finite fine-tuning
does not get that close: docs/llm.md measures it on the toy text world).

With ``diversity_weight`` w > 0 (``local`` mode only) each prompt's ``top_k`` are picked greedily instead:
first its best sample, then each time the one that maximises ``key + w * mean cosine distance`` between
its embedding and those already picked for the prompt. Pure best-of-K keeps near-copies of one mode (one
layout, one background) when other modes score almost as well; this keeps a spread set at a small cost
in reward (w is in reward units per unit of cosine distance).

With ``novelty_weight`` v > 0 (``local`` mode only) each eligible sample's key is first raised by
``v * mean cosine distance`` to the other eligible samples of its prompt, then the pick above (or the plain
``top_k`` when w is 0) runs on the raised keys. The pool is a draw from the current model, so this favours
good samples where the model puts little mass over equally good ones where it crowds: a model fine-tuned on
its own best samples otherwise collapses onto its best mode stage after stage.

With ``skip_top`` n > 0 (``local`` mode only) the ``n`` best samples of each prompt's pool by key are left out
before the pick: neither kept nor negatives, though they still count in the novelty term's distances. A proxy
reward parts from what it stands for most in its far tail, so a prompt's single best sample is often the one
that overshoots (on the toy world, subjects larger than the gold aesthetic wants); a prompt with fewer than
``n + top_k`` valid samples skips only as many as leave it ``top_k`` (:func:`skip_count`).

The ranking key is the reward, or ``reward - beta * log(p_theta / p_base)`` when ``kl_beta > 0``
and the generator supplied the log-ratio. NaN keys, and samples a task marked ``discarded`` (an LLM
filter, a diffusion prompt-match gate), are never selected. Ties break towards the
lower prompt index, then the lower sample index, so selections are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .errors import ConfigError
from .types import Sample

MODES = ("local", "global", "threshold")


def ranking_key(reward: float, log_ratio: float | None, kl_beta: float) -> float:
    """``r - beta * log(p_theta/p_base)``; plain reward when beta is 0 or the log-ratio is unknown."""
    if kl_beta and log_ratio is not None:
        return float(reward) - kl_beta * float(log_ratio)
    return float(reward)


def sample_key(s: Sample, kl_beta: float) -> float:
    """A sample's ranking key; NaN (never selected) when its task marked it ``discarded``."""
    return math.nan if s.extras.get("discarded") else ranking_key(s.reward, s.log_ratio, kl_beta)


def order_key(key: float, prompt_index: int, sample_index: int) -> tuple:
    """Sort key, larger is better: the ranking key, then lower prompt, then lower sample index."""
    return (key, -prompt_index, -sample_index)


def is_nan(x: float) -> bool:
    return x != x


def global_count(total: int, top_ratio: float) -> int:
    """How many samples ``global`` mode keeps out of ``total``: ceil(ratio * total), at least 1."""
    return max(1, math.ceil(top_ratio * total - 1e-9)) if total else 0


def stage_threshold(keys: Sequence[float], threshold: float, quantile: float | None = None, cap: float | None = None) -> float:
    """``threshold`` mode's cut for one stage: ``threshold``, or with ``quantile`` q the q-quantile of the valid
    (non-NaN) ``keys`` -- linear between order statistics, as numpy's default -- clamped to [threshold, cap]."""
    if quantile is None:
        return threshold
    vals = sorted(k for k in keys if not is_nan(k))
    if not vals:
        return threshold
    pos = quantile * (len(vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(vals) - 1)
    cut = max(threshold, vals[lo] + (vals[hi] - vals[lo]) * (pos - lo))
    return cut if cap is None else min(cut, cap)


def skip_count(n: int, top_k: int, skip_top: int) -> int:
    """``ranking.skip_top``: how many of a prompt's ``n`` valid samples, best first, are left out before its pick:
    ``skip_top``, or fewer where that would leave under ``top_k``."""
    return max(0, min(skip_top, n - top_k))


def diverse_pick(
    keys: Sequence[float], embeddings, k: int, weight: float, novelty: float = 0.0, gains: list | None = None, skip: int = 0
) -> list[int]:
    """Greedy spread-out top ``k`` of one group whose items come best first: positions into ``keys``.

    With ``novelty`` > 0 each item's gain is first raised by ``novelty * mean(1 - cos)`` to the group's
    other items (a sample in a crowded part of the pool gains little); then the first pick is the best gain and
    each next one maximises ``gain + weight * mean(1 - cos)`` to the picks so far. With ``weight`` 0 this is the
    plain top ``k`` by gain. Ties go to the earlier (better-ranked) item, so the result is deterministic. A list
    passed as ``gains`` receives every item's gain (its key raised by the novelty term), in the items' order. The
    first ``skip`` items (``ranking.skip_top``) are never picked, but count in the novelty term.
    """
    n = len(keys)
    if not n:
        return []
    import torch  # here, not at the top: the config imports this module and must load without torch

    e = torch.stack([torch.as_tensor(x, dtype=torch.float64).flatten() for x in embeddings])
    e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    dist = 1.0 - e @ e.T
    dist = (dist + dist.T) / 2  # exactly symmetric, so mathematically tied gains tie in floating point too
    dist.fill_diagonal_(0.0)
    gain = torch.as_tensor(list(keys), dtype=torch.float64)
    if novelty and n > 1:
        gain = gain + novelty * dist.sum(1) / (n - 1)
    if gains is not None:
        gains[:] = gain.tolist()
    dist_sum = torch.zeros_like(gain)
    free = torch.ones_like(gain, dtype=torch.bool)
    free[:skip] = False
    if not free.any():
        return []
    picked = [int(torch.where(free, gain, torch.tensor(-math.inf, dtype=torch.float64)).argmax())]
    while len(picked) < min(k, n - skip):
        last = picked[-1]
        free[last] = False
        dist_sum += dist[:, last]
        score = torch.where(free, gain + weight * dist_sum / len(picked), torch.tensor(-math.inf, dtype=torch.float64))
        picked.append(int(score.argmax()))  # argmax returns the first maximum
    return picked


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
    diversity_weight: float = 0.0,
    embeddings: Sequence | None = None,
    novelty_weight: float = 0.0,
    threshold_quantile: float | None = None,
    threshold_max: float | None = None,
    skip_top: int = 0,
    skipped: list | None = None,
) -> list[int]:
    """Reference (non-streaming) selection: indices of kept items, best first. A list passed as ``skipped``
    receives the indices ``skip_top`` left out."""
    if mode not in MODES:
        raise ValueError(f"unknown ranking mode {mode!r}; choose one of {', '.join(MODES)}")
    if skip_top and mode != "local":
        raise ConfigError(f"ranking.skip_top leaves out each prompt's best samples, so it needs ranking.mode=local (got {mode!r})")
    valid = [i for i, k in enumerate(keys) if not is_nan(k)]
    best_first = sorted(valid, key=lambda i: order_key(keys[i], prompt_indices[i], sample_indices[i]), reverse=True)
    groups: dict[int, list[int]] = {}
    for i in best_first:
        groups.setdefault(prompt_indices[i], []).append(i)
    skips = {p: skip_count(len(members), top_k, skip_top) for p, members in groups.items()}
    if skipped is not None:
        skipped[:] = [i for p, members in groups.items() for i in members[: skips[p]]]
    if diversity_weight or novelty_weight:
        check_diverse(mode, embeddings is not None)
        chosen = []
        for p, members in groups.items():
            picks = diverse_pick([keys[i] for i in members], [embeddings[i] for i in members], top_k, diversity_weight, novelty_weight, skip=skips[p])
            chosen += [members[j] for j in picks]
        chosen.sort(key=lambda i: order_key(keys[i], prompt_indices[i], sample_indices[i]), reverse=True)
    elif mode == "local":
        picked = {i for p, members in groups.items() for i in members[skips[p] : skips[p] + top_k]}
        chosen = [i for i in best_first if i in picked]
    elif mode == "global":
        chosen = best_first[: global_count(len(keys), top_ratio)]
    else:
        cut = stage_threshold(keys, threshold, threshold_quantile, threshold_max)
        chosen = [i for i in best_first if keys[i] >= cut]
    if max_kept is not None:
        chosen = chosen[:max_kept]
    return chosen


def uses_embeddings(ranking) -> bool:
    """Whether a RankingConfig-like object picks in embedding space (``diversity_weight`` or ``novelty_weight`` > 0)."""
    return bool(getattr(ranking, "diversity_weight", 0.0) or getattr(ranking, "novelty_weight", 0.0))


def check_diverse(mode: str, have_embeddings: bool) -> None:
    """Raise a one-line ConfigError when ``ranking.diversity_weight`` or ``novelty_weight`` > 0 cannot work."""
    if mode != "local":
        raise ConfigError(
            f"ranking.diversity_weight and ranking.novelty_weight pick within each prompt, so each needs ranking.mode=local (got {mode!r})"
        )
    if not have_embeddings:
        raise ConfigError(
            "ranking.diversity_weight or ranking.novelty_weight > 0 needs an embedding on every sample, and this "
            "generator supplies none; set both to 0"
        )


def select_samples(samples: Sequence[Sample], ranking) -> list[Sample]:
    """Apply a :class:`RankingConfig`-like object to samples (reference path; the pool streams)."""
    keys = [sample_key(s, ranking.kl_beta) for s in samples]
    w = getattr(ranking, "diversity_weight", 0.0)
    nw = getattr(ranking, "novelty_weight", 0.0)
    idx = select(
        keys,
        [s.prompt_index for s in samples],
        [s.sample_index for s in samples],
        mode=ranking.mode,
        top_k=ranking.top_k,
        top_ratio=ranking.top_ratio,
        threshold=ranking.threshold,
        max_kept=ranking.max_kept,
        diversity_weight=w,
        embeddings=([s.embedding for s in samples] if uses_embeddings(ranking) and all(s.embedding is not None for s in samples) else None),
        novelty_weight=nw,
        threshold_quantile=getattr(ranking, "threshold_quantile", None),
        threshold_max=getattr(ranking, "threshold_max", None),
        skip_top=getattr(ranking, "skip_top", 0),
    )
    return [samples[i] for i in idx]


def replay_pick(candidates: Sequence[tuple[int, Sample]], k: int) -> list[tuple[int, Sample]]:
    """``ranking.replay_top_k``: of earlier stages' kept samples, given as ``(stage, sample)`` pairs, the ``k``
    with the highest reward per prompt, best first within a prompt, prompts in increasing order. NaN rewards are
    never replayed; equal rewards go to the later stage (a more recent model), then the lower sample index."""
    groups: dict[int, list[tuple[int, Sample]]] = {}
    for stage, s in candidates:
        if not is_nan(s.reward):
            groups.setdefault(s.prompt_index, []).append((stage, s))
    out = []
    for p in sorted(groups):
        members = sorted(groups[p], key=lambda c: (c[1].reward, c[0], -c[1].sample_index), reverse=True)
        out += members[: max(0, k)]
    return out


def select_negatives(
    keys: Sequence[float], prompt_indices: Sequence[int], sample_indices: Sequence[int], m: int, exclude: Sequence[int] = ()
) -> list[int]:
    """Reference pick of ``ranking.negative_k``: per prompt, the ``m`` items with the lowest ranking key (the worst
    samples of its pool), never an item in ``exclude`` (the kept ones, and those ``skip_top`` left out) and never a NaN key (no score, or discarded).
    Positions into ``keys``, prompts in increasing order, worst first within a prompt; equal keys go to the lower
    sample index."""
    skip = set(exclude)
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        if i not in skip and not is_nan(k):
            groups.setdefault(prompt_indices[i], []).append(i)
    out = []
    for p in sorted(groups):
        out += sorted(groups[p], key=lambda i: (keys[i], sample_indices[i]))[: max(0, m)]
    return out


def kept_weights(rewards: Sequence[float], prompt_indices: Sequence[int], temperature: float | None) -> list[float]:
    """Per-sample loss weights of a training set (``train.reward_weight_temperature``, reward-weighted regression
    within each prompt): ``exp((r_i - max_p r) / temperature)`` with ``max_p r`` the best reward of sample i's
    prompt in the set, then scaled so that the weights average 1 over the set (the loss keeps its scale). Each
    prompt's best sample weighs the same, a sample ``temperature`` below it ``1/e`` of that. None = all 1."""
    n = len(rewards)
    if temperature is None:
        return [1.0] * n
    if not temperature > 0:
        raise ConfigError(f"the reward weight temperature must be > 0 or null (got {temperature})")
    if any(is_nan(r) for r in rewards):
        raise ValueError("kept_weights needs a reward on every training sample (got NaN)")
    best: dict[int, float] = {}
    for r, p in zip(rewards, prompt_indices):
        best[p] = max(best.get(p, -math.inf), float(r))
    raw = [math.exp((float(r) - best[p]) / temperature) for r, p in zip(rewards, prompt_indices)]
    mean = sum(raw) / n if n else 1.0
    return [w / mean for w in raw]


def negative_weights(rewards: Sequence[float], pool_means: Sequence[float], scale: float | None) -> list[float]:
    """Per-negative loss weights of ``train.negative_advantage_scale``: ``max(0, m - r) / scale`` with ``r`` the
    negative's reward and ``m`` the mean reward of its prompt's pool. A negative ``scale`` reward units below its
    pool's mean weighs 1, one at or above the mean 0: early, when the worst samples are far below the rest, they push
    as with equal weights; once the pool is uniformly good its worst are near its mean and push little. None = all 1."""
    if scale is None:
        return [1.0] * len(rewards)
    if not scale > 0:
        raise ConfigError(f"the negative advantage scale must be > 0 or null (got {scale})")
    if any(is_nan(r) or is_nan(m) for r, m in zip(rewards, pool_means)):
        raise ValueError("negative_weights needs a reward and a pool mean on every negative (got NaN)")
    return [max(0.0, float(m) - float(r)) / scale for r, m in zip(rewards, pool_means)]


def advantage_weights(rewards: Sequence[float], pool_means: Sequence[float], pool_sds: Sequence[float], sign: int) -> list[float]:
    """Per-sample loss weights of ``train.advantage_weights``: ``max(0, sign * (r - m) / s)``, the sample's reward as
    a standard score within its prompt's pool (mean ``m``, standard deviation ``s``), as DDPO and GRPO normalise
    their advantages. ``sign`` +1 weighs kept samples (those above the pool's mean count, the further the more), -1
    negatives (those below it). A pool with one reward (``s`` 0) gives weight 0: nothing to prefer."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1 (got {sign!r})")
    out = []
    for r, m, s in zip(rewards, pool_means, pool_sds, strict=True):
        if is_nan(r) or is_nan(m) or is_nan(s):
            raise ValueError("advantage_weights needs a reward, a pool mean and a pool sd on every sample (got NaN)")
        out.append(max(0.0, sign * (float(r) - float(m)) / float(s)) if s > 0 else 0.0)
    return out
