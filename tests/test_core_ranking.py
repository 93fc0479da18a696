"""Ranking and the streaming pool against brute-force references."""

import math
import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raft_diffusion.core.errors import ConfigError
from raft_diffusion.core.pool import StreamingPool
from raft_diffusion.core.ranking import (
    diverse_pick,
    global_count,
    kept_weights,
    ranking_key,
    replay_pick,
    select,
    select_negatives,
    select_samples,
)
from raft_diffusion.core.types import Sample


def R(mode="local", top_k=1, top_ratio=0.25, threshold=0.0, max_kept=None, kl_beta=0.0, diversity_weight=0.0, novelty_weight=0.0):
    return SimpleNamespace(
        mode=mode,
        top_k=top_k,
        top_ratio=top_ratio,
        threshold=threshold,
        max_kept=max_kept,
        kl_beta=kl_beta,
        diversity_weight=diversity_weight,
        novelty_weight=novelty_weight,
    )


def brute_local(rewards, P, K, k):
    """For each prompt, sort its samples by (-reward, sample index) and take k non-NaN."""
    out = set()
    for p in range(P):
        items = [(rewards[p * K + j], j) for j in range(K) if not math.isnan(rewards[p * K + j])]
        items.sort(key=lambda t: (-t[0], t[1]))
        out |= {(p, j) for _, j in items[:k]}
    return out


def make(rewards, P, K, log_ratios=None):
    return [
        Sample(
            prompt_index=p,
            sample_index=j,
            seed=p * 100 + j,
            reward=rewards[p * K + j],
            log_ratio=None if log_ratios is None else log_ratios[p * K + j],
            payload=("img", p, j),
        )
        for p in range(P)
        for j in range(K)
    ]


reward_lists = st.integers(1, 5).flatmap(
    lambda P: st.integers(1, 6).flatmap(
        lambda K: st.tuples(
            st.just(P),
            st.just(K),
            st.lists(st.one_of(st.floats(-3, 3), st.sampled_from([0.0, 1.0, math.nan])), min_size=P * K, max_size=P * K),
        )
    )
)


@settings(max_examples=150, deadline=None)
@given(reward_lists, st.integers(1, 6), st.integers(1, 4))
def test_local_pool_equals_bruteforce_and_holds_at_most_topk(data, k, batch):
    P, K, rewards = data
    k = min(k, K)
    samples = make(rewards, P, K)
    order = list(range(len(samples)))
    random.Random(P * 31 + K).shuffle(order)  # arrival order must not matter
    pool = StreamingPool(R("local", top_k=k), expected_total=len(samples))
    for i in range(0, len(order), batch):
        pool.add([samples[j] for j in order[i : i + batch]])
        per_prompt = {}
        for s in pool.records:
            if s.payload is not None:
                per_prompt[s.prompt_index] = per_prompt.get(s.prompt_index, 0) + 1
        assert all(v <= k for v in per_prompt.values())
    kept = pool.kept()
    assert {(s.prompt_index, s.sample_index) for s in kept} == brute_local(rewards, P, K, k)
    assert all(s.payload is not None for s in kept)
    assert all(not math.isnan(s.reward) for s in kept)
    assert sum(s.payload is not None for s in pool.records) == len(kept)
    assert [s.extras["kept"] for s in pool.records].count(True) == len(kept)
    # The reference selection agrees, element for element, in best-first order.
    ref = select([s.reward for s in samples], [s.prompt_index for s in samples], [s.sample_index for s in samples], mode="local", top_k=k)
    assert sorted((samples[i].prompt_index, samples[i].sample_index) for i in ref) == sorted((s.prompt_index, s.sample_index) for s in kept)


@settings(max_examples=150, deadline=None)
@given(reward_lists, st.floats(0.05, 1.0), st.one_of(st.none(), st.integers(1, 5)))
def test_global_pool_equals_sorted_topn(data, ratio, max_kept):
    P, K, rewards = data
    samples = make(rewards, P, K)
    pool = StreamingPool(R("global", top_ratio=ratio, max_kept=max_kept), expected_total=len(samples))
    pool.add(reversed(samples))
    kept = pool.kept()
    valid = sorted((i for i in range(len(rewards)) if not math.isnan(rewards[i])), key=lambda i: (-rewards[i], i // K, i % K))
    n = global_count(len(rewards), ratio)
    if max_kept is not None:
        n = min(n, max_kept)
    assert [(s.prompt_index, s.sample_index) for s in kept] == [(i // K, i % K) for i in valid[:n]]


@settings(max_examples=100, deadline=None)
@given(reward_lists, st.floats(-2, 2))
def test_threshold_pool(data, thr):
    P, K, rewards = data
    pool = StreamingPool(R("threshold", threshold=thr), expected_total=P * K)
    pool.add(make(rewards, P, K))
    got = {(s.prompt_index, s.sample_index) for s in pool.kept()}
    assert got == {(i // K, i % K) for i, r in enumerate(rewards) if not math.isnan(r) and r >= thr}


def test_ties_break_by_prompt_then_sample_index():
    rewards = [1.0, 1.0, 1.0, 1.0, 0.5, 1.0]  # 2 prompts x 3 samples, all tied at the top
    samples = make(rewards, 2, 3)
    pool = StreamingPool(R("global", top_ratio=0.5), expected_total=6)
    pool.add(samples[::-1])
    assert [(s.prompt_index, s.sample_index) for s in pool.kept()] == [(0, 0), (0, 1), (0, 2)]
    local = StreamingPool(R("local", top_k=1), expected_total=6)
    local.add(samples[::-1])
    assert [(s.prompt_index, s.sample_index) for s in local.kept()] == [(0, 0), (1, 0)]


def test_nan_never_selected_even_when_nothing_else():
    samples = make([math.nan, math.nan, 2.0, math.nan], 2, 2)
    pool = StreamingPool(R("local", top_k=2), expected_total=4)
    pool.add(samples)
    assert [(s.prompt_index, s.sample_index) for s in pool.kept()] == [(1, 0)]


@pytest.mark.parametrize("w", [0.0, 2.0])
def test_discarded_samples_are_never_kept_however_well_they_score(w):
    samples = make([9.0, 1.0, 0.5, 8.0, 2.0, 3.0], 2, 3)
    samples[0].extras["discarded"] = "eval CLIP ranks its prompt 3 of 4"
    samples[3].extras["discarded"] = "eval CLIP ranks its prompt 2 of 4"
    for s in samples:
        s.embedding = torch.tensor([1.0, float(s.sample_index)])
    pool = StreamingPool(R("local", top_k=2, diversity_weight=w), expected_total=6)
    pool.add(samples)
    kept = [(s.prompt_index, s.sample_index) for s in pool.kept()]
    assert set(kept) == {(0, 1), (0, 2), (1, 1), (1, 2)}
    assert [(s.prompt_index, s.sample_index) for s in select_samples(samples, R("local", top_k=2, diversity_weight=w))] == kept
    assert samples[0].payload is None and samples[0].reward == 9.0  # scored and logged, not kept


def test_kl_key_changes_only_the_ranking():
    assert ranking_key(2.0, 10.0, 0.1) == pytest.approx(1.0)
    assert ranking_key(2.0, None, 0.1) == 2.0  # generator supplied no log-ratio: no-op
    assert ranking_key(2.0, 10.0, 0.0) == 2.0
    # Sample 0 has the higher reward but drifted far from the base; with beta=0.1 sample 1 wins.
    samples = make([2.0, 1.5], 1, 2, log_ratios=[10.0, 0.0])
    plain = StreamingPool(R("local"), 2)
    plain.add(make([2.0, 1.5], 1, 2, log_ratios=[10.0, 0.0]))
    assert plain.kept()[0].sample_index == 0
    kl = StreamingPool(R("local", kl_beta=0.1), 2)
    kl.add(samples)
    assert kl.kept()[0].sample_index == 1
    assert kl.kept()[0].reward == 1.5  # the reward itself is untouched


def test_local_then_max_kept_like_the_raft_notebook():
    # best per prompt, then the global top 2 of those
    rewards = [0.1, 0.9, 0.5, 0.2, 0.8, 0.3, 0.7, 0.6, 0.0]  # 3 prompts x 3
    pool = StreamingPool(R("local", top_k=1, max_kept=2), expected_total=9)
    pool.add(make(rewards, 3, 3))
    assert [(s.prompt_index, s.sample_index, s.reward) for s in pool.kept()] == [(0, 1, 0.9), (1, 1, 0.8)]
    assert sum(s.payload is not None for s in pool.records) == 2


@settings(max_examples=60, deadline=None)
@given(reward_lists, st.sampled_from(["local", "global", "threshold"]), st.one_of(st.none(), st.integers(1, 4)))
def test_payload_count_matches_the_records(data, mode, max_kept):
    P, K, rewards = data
    pool = StreamingPool(R(mode, top_k=1, top_ratio=0.3, threshold=0.0, max_kept=max_kept), expected_total=P * K)
    samples = make(rewards, P, K)
    for i in range(0, len(samples), 3):
        pool.add(samples[i : i + 3])
        assert pool.num_payloads_held() == sum(s.payload is not None for s in pool.records)
    pool.kept()
    assert pool.num_payloads_held() == sum(s.payload is not None for s in pool.records)


# ---------------------------------------------------------------------------------- diversity_weight


def test_diverse_pick_trades_reward_for_spread():
    keys = [5.0, 4.9, 4.0]  # item 1 is a near-copy of item 0; item 2 is orthogonal but scores 1.0 less
    emb = [[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]]
    assert diverse_pick(keys, emb, 2, 0.5) == [0, 1]  # 4.9 + 0.5 * 5e-5 beats 4.0 + 0.5 * 1
    assert diverse_pick(keys, emb, 2, 2.0) == [0, 2]  # 4.0 + 2 * 1 beats 4.9 + 2 * 5e-5
    # third pick: item 1's mean distance to {0, 2} is (5e-5 + 0.990) / 2
    assert diverse_pick(keys, emb, 3, 2.0) == [0, 2, 1]
    assert diverse_pick(keys, emb, 9, 2.0) == [0, 2, 1]  # k beyond the group: every item once


def test_novelty_pick_prefers_the_sample_in_the_sparse_part_of_the_pool():
    # items 0-2 crowd one mode (0 scores best); item 3 sits alone in another and scores 0.3 less than item 0
    keys = [5.0, 4.9, 4.8, 4.7]
    emb = [[1.0, 0.0], [1.0, 0.02], [1.0, -0.02], [0.0, 1.0]]
    assert diverse_pick(keys, emb, 1, 0.0) == [0]
    # item 0's mean distance to the others is about 1/3; item 3's is about 1: a gain of 2v/3 over item 0
    assert diverse_pick(keys, emb, 1, 0.0, novelty=0.3) == [0]  # +0.2 < 0.3
    assert diverse_pick(keys, emb, 1, 0.0, novelty=0.6) == [3]  # +0.4 > 0.3
    assert diverse_pick(keys, emb, 2, 0.0, novelty=0.6) == [3, 0]  # then the plain best by gain
    assert diverse_pick(keys, emb, 2, 0.0, novelty=0.0) == [0, 1]


def brute_diverse(rewards, embs, P, K, k, w, v=0.0):
    """Per prompt: gain = reward + v * mean(1 - cos) to the prompt's other valid samples; best gain first (ties:
    better reward, then lower index); then greedily gain + w * mean(1 - cos) to the picks so far."""

    def cos_dist(a, b):
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
        return 1.0 - sum(x * y for x, y in zip(a, b)) / (na * nb)

    out = set()
    for p in range(P):
        items = sorted((j for j in range(K) if not math.isnan(rewards[p * K + j])), key=lambda j: (-rewards[p * K + j], j))
        gain = {
            j: rewards[p * K + j]
            + (v * sum(cos_dist(embs[p * K + j], embs[p * K + i]) for i in items if i != j) / (len(items) - 1) if len(items) > 1 else 0.0)
            for j in items
        }
        picked = [max(items, key=lambda j: (gain[j], -items.index(j)))] if items else []
        while items and len(picked) < min(k, len(items)):
            rest = [j for j in items if j not in picked]
            score = {j: gain[j] + w * sum(cos_dist(embs[p * K + j], embs[p * K + i]) for i in picked) / len(picked) for j in rest}
            picked.append(max(rest, key=lambda j: (score[j], -items.index(j))))
        out |= {(p, j) for j in picked}
    return out


@settings(max_examples=120, deadline=None)
@given(
    reward_lists,
    st.integers(1, 6),
    st.integers(1, 4),
    st.sampled_from([(0.3, 0.0), (1.0, 0.0), (4.0, 0.0), (0.0, 2.0), (1.0, 3.0)]),
    st.randoms(use_true_random=False),
)
def test_diverse_pool_equals_bruteforce_greedy(data, k, batch, wv, rnd):
    w, v = wv
    P, K, rewards = data
    k = min(k, K)
    embs = [[rnd.uniform(-1, 1) for _ in range(3)] + [0.05] for _ in range(P * K)]  # never the zero vector
    samples = make(rewards, P, K)
    for s, e in zip(samples, embs):
        s.embedding = e
    order = list(range(len(samples)))
    rnd.shuffle(order)  # arrival order must not matter
    pool = StreamingPool(R("local", top_k=k, diversity_weight=w, novelty_weight=v), expected_total=len(samples))
    for i in range(0, len(order), batch):
        pool.add([samples[j] for j in order[i : i + batch]])
    kept = pool.kept()
    want = brute_diverse(rewards, embs, P, K, k, w, v)
    assert {(s.prompt_index, s.sample_index) for s in kept} == want
    assert [s.reward for s in kept] == sorted((s.reward for s in kept), reverse=True)  # best first, as always
    # the streaming pool and the reference selection agree, and only the kept hold payloads afterwards
    ref = select(
        [s.reward for s in samples],
        [s.prompt_index for s in samples],
        [s.sample_index for s in samples],
        mode="local",
        top_k=k,
        diversity_weight=w,
        embeddings=embs,
        novelty_weight=v,
    )
    assert {(samples[i].prompt_index, samples[i].sample_index) for i in ref} == want
    assert {(s.prompt_index, s.sample_index) for s in pool.records if s.payload is not None} == want
    assert pool.num_payloads_held() == len(want)


def test_diverse_selection_needs_local_mode_and_embeddings():
    with pytest.raises(ConfigError, match="needs ranking.mode=local"):
        StreamingPool(R("global", diversity_weight=1.0), expected_total=4)
    pool = StreamingPool(R("local", top_k=2, diversity_weight=1.0), expected_total=4)
    with pytest.raises(ConfigError, match="this generator supplies none"):
        pool.add(make([1.0, 2.0], 1, 2))


class _Gather:  # what dist.gather hands back on the main process
    enabled = True

    def __init__(self, parts):
        self.parts = parts

    def gather(self, records):
        return self.parts


def merge_two_processes(ranking, samples, size, per_process):
    """The loop's merge of two processes' pools as process 0 sees it (process 1 first takes its local step): process
    ``rank`` streams the samples with ``sample_index // per_process == rank`` of every prompt."""
    from raft_diffusion.core.loop import _merge_pools

    halves = []
    for rank in range(2):
        pool = StreamingPool(ranking, size)
        pool.add([s for s in samples() if s.sample_index // per_process == rank])
        halves.append(pool)
    cfg = SimpleNamespace(ranking=ranking)
    _merge_pools(cfg, halves[1], size, _Gather([]))
    return _merge_pools(cfg, halves[0], size, _Gather([h.records for h in halves]))


def one_and_merged(ranking, seed, P=3, K=8):
    """A random pool of ``P`` prompts x ``K`` samples (rewards, 4-d embeddings) picked by one process's pool and by
    two processes' merged pools (process ``rank`` gets samples ``rank*K/2 ..`` of every prompt). Returns the rewards,
    the embeddings, one pool's kept ``(prompt, sample)`` ids best first, and the merged pool's kept samples."""
    rnd = random.Random(seed)
    rewards = [rnd.uniform(0, 1) for _ in range(P * K)]
    embs = [[rnd.uniform(-1, 1) for _ in range(4)] for _ in range(P * K)]

    def fresh():
        out = make(rewards, P, K)
        for s, e in zip(out, embs):
            s.embedding = e
        return out

    one = StreamingPool(ranking, P * K)
    one.add(fresh())
    want = [(s.prompt_index, s.sample_index) for s in one.kept()]
    return rewards, embs, want, merge_two_processes(ranking, fresh, P * K, K // 2).kept()


@pytest.mark.parametrize("w, v", [(0.0, 0.0), (3.0, 0.0), (0.0, 4.0)])
def test_merged_pools_of_two_processes_select_what_one_does(w, v):
    """Each process streams half of every prompt's samples; the merged pick equals one pool's, payloads included."""
    P, K, k = 3, 8, 3
    rewards, _, want, kept = one_and_merged(R("local", top_k=k, diversity_weight=w, novelty_weight=v), 7, P, K)
    assert [(s.prompt_index, s.sample_index) for s in kept] == want
    assert all(s.payload == ("img", s.prompt_index, s.sample_index) for s in kept)
    if w or v:  # the spread-out or novelty pick differs from the plain top k here, so the test covers what it is about
        assert set(want) != set(brute_local(rewards, P, K, k))


def test_stage_threshold_by_hand():
    """The q-quantile interpolates between order statistics (numpy's default), clamped to [threshold, cap]."""
    from raft_diffusion.core.ranking import stage_threshold

    keys = [4.0, 1.0, math.nan, 3.0, 2.0]  # valid, sorted: 1 2 3 4; q=0.75 -> position 2.25 -> 3 + 0.25 * (4 - 3)
    assert stage_threshold(keys, 0.0, 0.75) == pytest.approx(3.25)
    assert stage_threshold(keys, 0.0, 0.5) == pytest.approx(2.5)
    assert stage_threshold(keys, 3.5, 0.5) == 3.5  # never below ranking.threshold
    assert stage_threshold(keys, 0.0, 0.75, cap=3.1) == 3.1  # never above threshold_max
    assert stage_threshold(keys, 0.7, None) == 0.7  # no quantile: the fixed threshold
    assert stage_threshold([math.nan], 0.7, 0.5) == 0.7


@settings(max_examples=60, deadline=None)
@given(reward_lists, st.floats(-2, 2), st.floats(0.05, 0.95), st.one_of(st.none(), st.floats(-1, 3)), st.one_of(st.none(), st.integers(1, 5)))
def test_rising_threshold_pool_equals_reference(data, thr, q, cap, max_kept):
    """The streaming pool (which learns the cut only at the end) keeps what the reference keeps, payloads included."""
    P, K, rewards = data
    cap = None if cap is None else max(cap, thr)
    r = SimpleNamespace(**vars(R("threshold", threshold=thr, max_kept=max_kept)), threshold_quantile=q, threshold_max=cap)
    pool = StreamingPool(r, expected_total=P * K)
    pool.add(make(rewards, P, K))
    kept = pool.kept()
    valid = sorted(x for x in rewards if not math.isnan(x))
    cut = thr
    if valid:
        pos = q * (len(valid) - 1)
        lo = int(pos)
        cut = max(thr, valid[lo] + (valid[min(lo + 1, len(valid) - 1)] - valid[lo]) * (pos - lo))
        cut = cut if cap is None else min(cut, cap)
    assert pool.cut == pytest.approx(cut)
    ref = select(
        rewards,
        [i // K for i in range(P * K)],
        [i % K for i in range(P * K)],
        mode="threshold",
        threshold=thr,
        max_kept=max_kept,
        threshold_quantile=q,
        threshold_max=cap,
    )
    assert [(s.prompt_index, s.sample_index) for s in kept] == [(i // K, i % K) for i in ref]
    assert all(x >= pool.cut for x in (s.reward for s in kept))
    assert all(s.payload == ("img", s.prompt_index, s.sample_index) for s in kept)
    assert pool.num_payloads_held() == len(kept)


def test_rising_threshold_over_two_processes_selects_what_one_does():
    """The cut is the quantile of every process's keys, not of each process's own."""
    P, K = 2, 4
    rewards = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6]  # process 0 gets samples 0-1 of each prompt, process 1 samples 2-3
    ranking = SimpleNamespace(**vars(R("threshold", threshold=0.0)), threshold_quantile=0.5, threshold_max=None)
    one = StreamingPool(ranking, P * K)
    one.add(make(rewards, P, K))
    want = [(s.prompt_index, s.sample_index) for s in one.kept()]
    assert one.cut == pytest.approx(0.5) and len(want) == 4
    merged = merge_two_processes(ranking, lambda: make(rewards, P, K), P * K, 2)
    kept = merged.kept()
    assert [(s.prompt_index, s.sample_index) for s in kept] == want
    assert all(s.payload == ("img", s.prompt_index, s.sample_index) for s in kept)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 4), st.integers(0, 2), st.integers(0, 5), st.one_of(st.sampled_from([0.0, 1.0, math.nan]), st.floats(-3, 3))),
        max_size=30,
        unique_by=lambda c: c[:3],
    ),
    st.integers(0, 4),
)
def test_replay_pick_equals_bruteforce_topk_across_stages(cands, k):
    """ranking.replay_top_k: per prompt, the k best rewards of all earlier stages' kept samples (ties: later stage,
    then lower sample index); brute force: every stage's samples of a prompt in one list, sorted, cut at k."""
    pairs = [(stage, Sample(prompt_index=p, sample_index=j, seed=0, reward=r)) for stage, p, j, r in cands]
    got = [(stage, s.prompt_index, s.sample_index) for stage, s in replay_pick(pairs, k)]
    want = []
    for p in sorted({c[1] for c in cands}):
        mine = [(r, stage, j) for stage, q, j, r in cands if q == p and not math.isnan(r)]
        mine.sort(key=lambda x: (-x[0], -x[1], x[2]))
        want += [(stage, p, j) for _, stage, j in mine[:k]]
    assert got == want


def test_replay_pick_by_hand():
    s = lambda p, j, r: Sample(prompt_index=p, sample_index=j, seed=0, reward=r)  # noqa: E731
    pairs = [(1, s(0, 3, 7.0)), (1, s(0, 5, 8.5)), (2, s(0, 1, 8.0)), (2, s(0, 3, 8.5)), (1, s(1, 0, 6.0)), (3, s(1, 2, math.nan))]
    got = [(st_, x.prompt_index, x.sample_index) for st_, x in replay_pick(pairs, 2)]
    assert got == [(2, 0, 3), (1, 0, 5), (1, 1, 0)]  # 8.5 of stage 2 before 8.5 of stage 1; NaN never replayed


def test_kept_weights_by_hand():
    """exp((r - best of the prompt) / T), scaled to average 1 over the set."""
    rewards, prompts = [8.0, 7.5, 7.0, 6.0, 6.0], [0, 0, 0, 1, 1]
    raw = [1.0, math.exp(-1.0), math.exp(-2.0), 1.0, 1.0]
    mean = sum(raw) / 5
    assert kept_weights(rewards, prompts, 0.5) == pytest.approx([x / mean for x in raw], rel=1e-12)
    assert sum(kept_weights(rewards, prompts, 0.5)) == pytest.approx(5.0)
    assert kept_weights(rewards, prompts, None) == [1.0] * 5
    assert kept_weights(rewards, prompts, 1e6) == pytest.approx([1.0] * 5, rel=1e-5)  # a hot temperature: plain RAFT
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        kept_weights(rewards, prompts, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        kept_weights([1.0, math.nan], [0, 0], 1.0)


def brute_negatives(rewards, P, K, m, kept, discarded=()):
    """Per prompt, the m lowest rewards (ties: lower sample index) among its scored, not kept, not discarded
    samples, worst first."""
    out = []
    for p in range(P):
        items = [(rewards[p * K + j], j) for j in range(K) if not math.isnan(rewards[p * K + j]) and (p, j) not in kept and (p, j) not in discarded]
        out += [(p, j) for _, j in sorted(items)[:m]]
    return out


@settings(max_examples=150, deadline=None)
@given(reward_lists, st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.booleans(), st.randoms(use_true_random=False))
def test_negatives_equal_bruteforce_bottom_m_per_prompt(data, k, m, batch, spread, rnd):
    """ranking.negative_k: the streaming pool hands over, per prompt, the m worst samples not kept, with payloads;
    never a discarded or unscored one; the kept selection is what it is without negatives."""
    P, K, rewards = data
    k = min(k, K)
    samples = make(rewards, P, K)
    discarded = {(s.prompt_index, s.sample_index) for s in samples if rnd.random() < 0.2}
    for s in samples:
        s.embedding = [rnd.uniform(-1, 1) for _ in range(3)] + [0.05]
        if (s.prompt_index, s.sample_index) in discarded:
            s.extras["discarded"] = "test"
    w = 1.0 if spread else 0.0
    ranking = SimpleNamespace(**vars(R("local", top_k=k, diversity_weight=w)), negative_k=m)
    order = list(range(len(samples)))
    rnd.shuffle(order)  # arrival order must not matter
    pool = StreamingPool(ranking, expected_total=len(samples))
    for i in range(0, len(order), batch):
        pool.add([samples[j] for j in order[i : i + batch]])
    kept = pool.kept()
    negatives = pool.negatives()
    kept_ids = {(s.prompt_index, s.sample_index) for s in kept}
    want = brute_negatives(rewards, P, K, m, kept_ids, discarded)
    assert [(s.prompt_index, s.sample_index) for s in negatives] == want
    assert all(s.payload == ("img", s.prompt_index, s.sample_index) and s.extras["negative"] for s in negatives)
    keys = [math.nan if s.extras.get("discarded") else s.reward for s in samples]
    excl = [i for i, s in enumerate(samples) if (s.prompt_index, s.sample_index) in kept_ids]
    ref = select_negatives(keys, [s.prompt_index for s in samples], [s.sample_index for s in samples], m, excl)
    assert [(samples[i].prompt_index, samples[i].sample_index) for i in ref] == want
    plain = StreamingPool(R("local", top_k=k, diversity_weight=w), expected_total=len(samples))
    plain.add([_copy_sample(s) for s in samples])
    assert [(s.prompt_index, s.sample_index) for s in plain.kept()] == [(s.prompt_index, s.sample_index) for s in kept]


def _copy_sample(s):
    return Sample(s.prompt_index, s.sample_index, s.seed, s.reward, payload=s.payload, embedding=s.embedding, extras=dict(s.extras))


def test_negatives_by_hand():
    """Two prompts of 5: top 2 kept, the 2 worst of the rest handed over (a tie goes to the lower sample index)."""
    samples = make([5.0, 1.0, 3.0, 1.0, 4.0, 2.0, math.nan, 0.5, 9.0, 7.0], 2, 5)
    pool = StreamingPool(SimpleNamespace(**vars(R("local", top_k=2)), negative_k=2), expected_total=10)
    pool.add(samples)
    assert [(s.prompt_index, s.sample_index) for s in pool.kept()] == [(1, 3), (1, 4), (0, 0), (0, 4)]
    assert [(s.prompt_index, s.sample_index) for s in pool.negatives()] == [(0, 1), (0, 3), (1, 2), (1, 0)]
    off = StreamingPool(R("local", top_k=2), expected_total=10)
    assert off.negative_k == 0


def test_merged_pools_of_two_processes_hand_over_the_same_negatives():
    rnd = random.Random(3)
    P, K, k, m = 3, 8, 2, 3
    rewards = [rnd.uniform(0, 1) for _ in range(P * K)]
    ranking = SimpleNamespace(**vars(R("local", top_k=k)), negative_k=m)
    one = StreamingPool(ranking, P * K)
    one.add(make(rewards, P, K))
    one.kept()
    want_negatives = one.negatives()
    want = [(s.prompt_index, s.sample_index) for s in want_negatives]
    merged = merge_two_processes(ranking, lambda: make(rewards, P, K), P * K, 4)
    merged.kept()
    negatives = merged.negatives()
    assert [(s.prompt_index, s.sample_index) for s in negatives] == want
    # train.negative_advantage_scale's reference: the prompt's pool mean over every process's samples, by hand
    means = [sum(rewards[p * K : (p + 1) * K]) / K for p in range(P)]
    assert [s.extras["pool_mean"] for s in negatives] == pytest.approx([means[s.prompt_index] for s in negatives], rel=1e-12)
    assert [s.extras["pool_mean"] for s in negatives] == [s.extras["pool_mean"] for s in want_negatives]
    assert all(s.payload == ("img", s.prompt_index, s.sample_index) for s in negatives)


def test_novelty_pick_records_each_samples_raised_key():
    """train.reward_weight_key=selection reads ``selection_key``: the reward plus novelty x the mean cosine distance
    to the prompt's other eligible samples, by hand (a discarded sample is not among them and gets none)."""
    samples = make([1.0, 0.5, 0.2, 9.0], 1, 4)
    for s, e in zip(samples, ([1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0])):
        s.embedding = e
    samples[3].extras["discarded"] = "off-prompt"
    pool = StreamingPool(R("local", top_k=2, novelty_weight=2.0), expected_total=4)
    pool.add(samples)
    kept = pool.kept()
    c = 1 / math.sqrt(2)
    dist = {0: (1 + (1 - c)) / 2, 1: (1 + (1 - c)) / 2, 2: ((1 - c) + (1 - c)) / 2}  # 1 - cos to the other two
    for j, d in dist.items():
        assert samples[j].selection_key == pytest.approx([1.0, 0.5, 0.2][j] + 2.0 * d, rel=1e-12)
    assert samples[3].selection_key is None
    assert [s.sample_index for s in kept] == [0, 1]
    plain = make([1.0, 0.5], 1, 2)
    p = StreamingPool(R("local", top_k=1), expected_total=2)
    p.add(plain)
    p.kept()
    assert all(s.selection_key is None for s in plain)  # only a novelty or spread pick records one


def test_negatives_stamp_the_pools_selection_key_stats_where_the_pick_raised_the_keys():
    """train.advantage_weights with train.reward_weight_key=selection: the kept samples and the negatives carry the
    mean and population std of their prompt's selection keys (scored samples only), by hand; a plain pick none."""
    samples = make([1.0, 0.5, 0.2, -3.0, 9.0, 4.0, 3.0, 1.0], 2, 4)
    for s, e in zip(samples, ([1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 1.0]) * 2):
        s.embedding = e
    samples[4].extras["discarded"] = "off-prompt"
    r = R("local", top_k=1, novelty_weight=2.0)
    r.negative_k = 1
    pool = StreamingPool(r, expected_total=8)
    pool.add(samples)
    kept = pool.kept()
    negatives = pool.negatives()
    for p in (0, 1):
        keys = [s.selection_key for s in samples[4 * p : 4 * p + 4] if s.selection_key is not None]
        assert len(keys) == (4 if p == 0 else 3)
        mean = sum(keys) / len(keys)
        sd = math.sqrt(sum((k - mean) ** 2 for k in keys) / len(keys))
        for s in [s for s in kept + negatives if s.prompt_index == p]:
            assert (s.extras["pool_selection_mean"], s.extras["pool_selection_sd"]) == (pytest.approx(mean, rel=1e-12), pytest.approx(sd, rel=1e-12))
    assert {(s.prompt_index, s.sample_index) for s in negatives} == {(0, 3), (1, 3)}
    plain = make([1.0, 0.5, 0.2], 1, 3)
    r = R("local", top_k=1)
    r.negative_k = 1
    q = StreamingPool(r, expected_total=3)
    q.add(plain)
    q.kept()
    assert all("pool_selection_mean" not in s.extras for s in q.negatives() + [plain[0]])
