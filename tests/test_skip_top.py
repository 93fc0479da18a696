"""ranking.skip_top: each prompt's best samples left out of the pick, against brute-force references."""

import math
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_core_loop import ScalarTask, _cfg
from test_core_ranking import R, brute_negatives, make, one_and_merged, reward_lists

from raft_diffusion.core.errors import ConfigError
from raft_diffusion.core.loop import run_raft
from raft_diffusion.core.pool import StreamingPool
from raft_diffusion.core.ranking import diverse_pick, select, select_negatives, skip_count
from raft_diffusion.core.rundir import RunDir, read_jsonl


def ranking(k, skip, w=0.0, v=0.0, m=0):
    return SimpleNamespace(**vars(R("local", top_k=k, diversity_weight=w, novelty_weight=v)), skip_top=skip, negative_k=m)


def cos_dist(a, b):
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    return 1.0 - sum(x * y for x, y in zip(a, b)) / (na * nb)


def brute(rewards, P, K, k, skip, embs=None, w=0.0, v=0.0):
    """Per prompt: its valid samples best first (ties: lower index); the first min(skip, n - k) are skipped; of the
    rest the top k, or with embeddings the greedy pick on reward + v * mean cosine distance to all the prompt's valid
    samples (the skipped ones too), then + w * mean distance to the picks so far. Returns (kept, skipped) sets."""
    kept, skipped = set(), set()
    for p in range(P):
        items = sorted((j for j in range(K) if not math.isnan(rewards[p * K + j])), key=lambda j: (-rewards[p * K + j], j))
        n_skip = max(0, min(skip, len(items) - k))
        skipped |= {(p, j) for j in items[:n_skip]}
        rest = items[n_skip:]
        if embs is None:
            kept |= {(p, j) for j in rest[:k]}
            continue
        e = {j: embs[p * K + j] for j in items}
        gain = {
            j: rewards[p * K + j] + (v * sum(cos_dist(e[j], e[i]) for i in items if i != j) / (len(items) - 1) if len(items) > 1 else 0.0)
            for j in items
        }
        picked = [max(rest, key=lambda j: (gain[j], -rest.index(j)))] if rest else []
        while len(picked) < min(k, len(rest)):
            free = [j for j in rest if j not in picked]
            score = {j: gain[j] + w * sum(cos_dist(e[j], e[i]) for i in picked) / len(picked) for j in free}
            picked.append(max(free, key=lambda j: (score[j], -rest.index(j))))
        kept |= {(p, j) for j in picked}
    return kept, skipped


def ids(samples):
    return {(s.prompt_index, s.sample_index) for s in samples}


def reference(samples, k, skip, **pick):
    """The reference ``select`` on ``samples`` (local mode): the kept ``(prompt, sample)`` ids best first, and the
    skipped ones."""
    skipped: list[int] = []
    cols = ([s.reward for s in samples], [s.prompt_index for s in samples], [s.sample_index for s in samples])
    kept = select(*cols, mode="local", top_k=k, skip_top=skip, skipped=skipped, **pick)
    at = [(s.prompt_index, s.sample_index) for s in samples]
    return [at[i] for i in kept], [at[i] for i in skipped]


def test_skip_count_by_hand():
    assert [skip_count(n, 2, 1) for n in range(6)] == [0, 0, 0, 1, 1, 1]  # a prompt keeps top_k while it can
    assert [skip_count(n, 1, 3) for n in range(6)] == [0, 0, 1, 2, 3, 3]
    assert skip_count(10, 3, 0) == 0


def test_plain_pick_by_hand():
    """Rewards 5, 9, 7, 8, 1 with top_k 2 and skip_top 1: the 9 is left out, the 8 and the 7 kept; the 1 is the
    negative, never the 9."""
    samples = make([5.0, 9.0, 7.0, 8.0, 1.0], 1, 5)
    pool = StreamingPool(ranking(2, 1, m=1), expected_total=5)
    pool.add(samples)
    kept = pool.kept()
    assert [s.reward for s in kept] == [8.0, 7.0]
    assert [s.reward for s in pool.records if s.extras.get("skipped")] == [9.0]
    assert [s.reward for s in pool.negatives()] == [1.0]
    skipped: list[int] = []
    assert select([s.reward for s in samples], [0] * 5, list(range(5)), mode="local", top_k=2, skip_top=1, skipped=skipped) == [3, 2]
    assert skipped == [1]


def test_novelty_pick_counts_the_skipped_sample_but_never_picks_it():
    """Three samples: a (best) and b share an embedding, c is apart. Skipping a, the novelty term still sees a next to
    b, so c (reward 1 below b) beats b once v > 1; without the skip a is picked first."""
    keys = [3.0, 2.0, 1.0]
    embs = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    # gains with v = 2: a 3 + 2 * (0 + 1) / 2 = 4, b 2 + 1 = 3, c 1 + 2 * (1 + 1) / 2 = 3; the tie goes to b, the earlier
    assert diverse_pick(keys, embs, 1, 0.0, novelty=2.0) == [0]
    assert diverse_pick(keys, embs, 1, 0.0, novelty=2.0, skip=1) == [1]
    assert diverse_pick(keys, embs, 1, 0.0, novelty=2.5, skip=1) == [2]  # c 1 + 2.5 = 3.5 > b 2 + 1.25
    assert diverse_pick(keys, embs, 2, 0.0, novelty=2.5, skip=1) == [2, 1]
    assert diverse_pick(keys, embs, 1, 0.0, skip=3) == []


@settings(max_examples=150, deadline=None)
@given(reward_lists, st.integers(1, 4), st.integers(0, 3), st.integers(1, 4), st.randoms(use_true_random=False))
def test_plain_pool_equals_bruteforce(data, k, skip, batch, rnd):
    P, K, rewards = data
    k = min(k, K)
    samples = make(rewards, P, K)
    order = list(range(len(samples)))
    rnd.shuffle(order)  # arrival order must not matter
    pool = StreamingPool(ranking(k, skip), expected_total=len(samples))
    for i in range(0, len(order), batch):
        pool.add([samples[j] for j in order[i : i + batch]])
        held: dict[int, int] = {}
        for s in pool.records:
            held[s.prompt_index] = held.get(s.prompt_index, 0) + (s.payload is not None)
        assert all(n <= k + skip for n in held.values())  # the heap holds top_k + skip_top per prompt, no more
    kept = pool.kept()
    want_kept, want_skipped = brute(rewards, P, K, k, skip)
    assert ids(kept) == want_kept
    assert {(s.prompt_index, s.sample_index) for s in pool.records if s.extras.get("skipped")} == want_skipped
    assert all(s.payload == ("img", s.prompt_index, s.sample_index) for s in kept)
    assert pool.num_payloads_held() == len(kept) == sum(s.payload is not None for s in pool.records)
    ref, skipped = reference(samples, k, skip)
    assert ref == [(s.prompt_index, s.sample_index) for s in kept]
    assert set(skipped) == want_skipped


@settings(max_examples=100, deadline=None)
@given(
    reward_lists,
    st.integers(1, 4),
    st.integers(1, 3),
    st.sampled_from([(1.0, 0.0), (0.0, 2.0), (1.0, 3.0)]),
    st.randoms(use_true_random=False),
)
def test_diverse_pool_equals_bruteforce(data, k, skip, wv, rnd):
    w, v = wv
    P, K, rewards = data
    k = min(k, K)
    embs = [[rnd.uniform(-1, 1) for _ in range(3)] + [0.05] for _ in range(P * K)]
    samples = make(rewards, P, K)
    for s, e in zip(samples, embs):
        s.embedding = e
    pool = StreamingPool(ranking(k, skip, w, v), expected_total=len(samples))
    pool.add(samples)
    kept = pool.kept()
    want_kept, want_skipped = brute(rewards, P, K, k, skip, embs, w, v)
    assert ids(kept) == want_kept
    assert {(s.prompt_index, s.sample_index) for s in pool.records if s.extras.get("skipped")} == want_skipped
    ref, skipped = reference(samples, k, skip, diversity_weight=w, novelty_weight=v, embeddings=embs)
    assert set(ref) == want_kept
    assert set(skipped) == want_skipped


@settings(max_examples=100, deadline=None)
@given(reward_lists, st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.booleans(), st.randoms(use_true_random=False))
def test_negatives_are_never_skipped_or_kept(data, k, skip, m, spread, rnd):
    """Tiny pools put a prompt's best among its worst m + top_k: the skipped one is still never a negative."""
    P, K, rewards = data
    k = min(k, K)
    samples = make(rewards, P, K)
    for s in samples:
        s.embedding = [rnd.uniform(-1, 1) for _ in range(3)] + [0.05]
    order = list(range(len(samples)))
    rnd.shuffle(order)
    pool = StreamingPool(ranking(k, skip, w=1.0 if spread else 0.0, m=m), expected_total=len(samples))
    for i in range(0, len(order), 2):
        pool.add([samples[j] for j in order[i : i + 2]])
    kept = pool.kept()
    negatives = pool.negatives()
    skipped = {(s.prompt_index, s.sample_index) for s in pool.records if s.extras.get("skipped")}
    want = brute_negatives(rewards, P, K, m, ids(kept) | skipped)
    assert [(s.prompt_index, s.sample_index) for s in negatives] == want
    assert all(s.payload == ("img", s.prompt_index, s.sample_index) for s in negatives)
    excl = [i for i, s in enumerate(samples) if (s.prompt_index, s.sample_index) in ids(kept) | skipped]
    ref = select_negatives([s.reward for s in samples], [s.prompt_index for s in samples], [s.sample_index for s in samples], m, excl)
    assert [(samples[i].prompt_index, samples[i].sample_index) for i in ref] == want


@pytest.mark.parametrize("w, v", [(0.0, 0.0), (0.0, 1.0), (2.0, 0.0)])
def test_merged_pools_of_two_processes_skip_what_one_does(w, v):
    """Each process streams half of every prompt's samples and does not skip on its own: the merged pool leaves out
    the same best samples as one pool and keeps the same ones, with their payloads."""
    P, K, k = 3, 8, 2
    rewards, embs, want, kept = one_and_merged(ranking(k, 2, w, v), 11, P, K)
    assert [(s.prompt_index, s.sample_index) for s in kept] == want
    assert all(s.payload == ("img", s.prompt_index, s.sample_index) for s in kept)
    assert ids(kept) == brute(rewards, P, K, k, 2, embs if (w or v) else None, w, v)[0]
    assert ids(kept) != brute(rewards, P, K, k, 0, embs if (w or v) else None, w, v)[0]  # the skip changes the pick here


def test_loop_keeps_the_next_best_and_marks_the_skipped(tmp_path):
    """ranking.skip_top=1, top_k 2, 6 samples a prompt: in every stage's samples.jsonl each prompt's best is marked
    skipped and not kept, its 2nd and 3rd best are kept, and the negatives are its 2 worst."""
    cfg = _cfg(**{"ranking.skip_top": 1, "ranking.negative_k": 2})
    run = RunDir(tmp_path / "skip")
    run.start(cfg.to_dict())
    task = ScalarTask(cfg)
    orig = task.finetune
    task.finetune = lambda stage, kept, negatives=None: orig(stage, kept)
    rows = run_raft(cfg, task, run)
    for st_ in range(1, 4):
        records = read_jsonl(run.stage_dir(st_) / "samples.jsonl")
        for p in range(3):
            mine = sorted((r for r in records if r["prompt_index"] == p), key=lambda r: (-r["reward"], r["sample_index"]))
            assert [bool(r.get("skipped")) for r in mine] == [True] + [False] * 5
            assert [r["kept"] for r in mine] == [False, True, True, False, False, False]
            assert [bool(r.get("negative")) for r in mine] == [False] * 4 + [True, True]
        assert rows[st_]["kept_reward_mean"] == pytest.approx(
            sum(sorted((r["reward"] for r in records if r["prompt_index"] == p), reverse=True)[i] for p in range(3) for i in (1, 2)) / 6
        )


@pytest.mark.parametrize(
    ("over", "match"),
    (
        ({"ranking.skip_top": -1}, "ranking.skip_top must be an integer >= 0"),
        ({"ranking.skip_top": 1.5}, "ranking.skip_top must be an integer"),
        ({"ranking.skip_top": 1, "ranking.mode": "global"}, "skip_top leaves out each prompt's best samples, so it needs ranking.mode=local"),
        ({"ranking.skip_top": 4}, r"ranking.skip_top=4 with ranking.top_k=2 leaves out and keeps all the sampling.num_per_prompt=6"),
    ),
)
def test_bad_skip_top(over, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**over)


def test_prune_keep_must_cover_the_skipped():
    from raft_diffusion.diffusion.config import config_from_dict

    with pytest.raises(ConfigError, match=r"prune_keep must be an integer from 3 \(ranking.top_k \+ ranking.skip_top\)"):
        config_from_dict({"ranking": {"top_k": 2, "skip_top": 1}}, ["sampling.num_per_prompt=8", "sampling.prune_step=2", "sampling.prune_keep=2"])
    config_from_dict({"ranking": {"top_k": 2, "skip_top": 1}}, ["sampling.num_per_prompt=8", "sampling.prune_step=2", "sampling.prune_keep=3"])
