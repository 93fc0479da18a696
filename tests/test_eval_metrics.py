"""Held-out metrics on constructed embeddings and rewards: CLIP score, diversity, best-of-K, components."""

import math

import pytest
import torch

from raft_diffusion.core.common import best_of_k, mean_std
from raft_diffusion.diffusion.metrics import clip_scores, diversity, eval_metrics, prompt_ranks

E1, E2, E3 = torch.eye(3)


def test_diversity_is_mean_pairwise_cosine_distance_per_prompt_then_over_prompts():
    emb = torch.stack(
        [
            E1,
            E2,  # prompt 0: orthogonal -> distance 1
            E3,
            5 * E3,  # prompt 1: same direction (scale does not matter) -> 0
            E1,
            -E1,
            E2,  # prompt 2: pairs (e1,-e1)=2, (e1,e2)=1, (-e1,e2)=1 -> 4/3
            E2,  # prompt 3: a single sample, no pair: left out
        ]
    )
    groups = [0, 0, 1, 1, 2, 2, 2, 3]
    assert diversity(emb, groups) == pytest.approx((1 + 0 + 4 / 3) / 3)
    assert diversity(emb[:2], [0, 0]) == pytest.approx(1.0)
    # 60 degrees apart: 1 - cos 60 = 0.5
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])
    assert diversity(torch.stack([a, 3 * b]), [7, 7]) == pytest.approx(0.5)
    assert math.isnan(diversity(emb[:2], [0, 1]))  # no prompt has two samples


def test_diversity_ignores_group_order_and_labels():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(12, 8, generator=g)
    groups = [i % 3 for i in range(12)]
    perm = torch.randperm(12, generator=g)
    assert diversity(emb[perm], [groups[i] * 10 + 5 for i in perm.tolist()]) == pytest.approx(diversity(emb, groups))


def test_clip_score_is_100_cosine_clipped_at_zero():
    img = torch.stack([E1, E1, E1 + E2, -E1])
    txt = torch.stack([E1, E1 + E2, 2 * E1 + 2 * E2, E1])
    assert clip_scores(img, txt).tolist() == pytest.approx([100.0, 100 / math.sqrt(2), 100.0, 0.0])


def test_prompt_rank_counts_the_prompts_strictly_closer_to_the_image():
    prompts = torch.stack([E1, E2, E1 + E2, -E1])  # cosines to E1: 1, 0, 0.71, -1
    img = torch.stack([E1, E1, E1, 3 * E1, E2, E1 + E2])
    own = [0, 2, 1, 3, 0, 2]
    assert prompt_ranks(img, prompts, own) == [1, 2, 3, 4, 3, 1]
    # a tie counts in the image's favour: E1 + E2 is as close to E1 as to E2 (both rank 2 for it)
    assert prompt_ranks(img[5:], prompts, [0]) == [2] and prompt_ranks(img[5:], prompts, [1]) == [2]


def test_best_of_k_is_mean_over_prompts_of_the_max_and_skips_nan():
    rewards = [0.1, 0.7, 0.3, -1.0, -0.5, math.nan, math.nan]
    groups = [0, 0, 0, 1, 1, 1, 2]  # prompt 2 has no score at all: left out
    assert best_of_k(rewards, groups) == pytest.approx((0.7 + -0.5) / 2)
    assert math.isnan(best_of_k([math.nan], [0]))


def test_mean_std_is_population_and_ignores_nan():
    assert mean_std([1.0, 3.0, math.nan]) == pytest.approx((2.0, 1.0))
    m, s = mean_std([math.nan])
    assert math.isnan(m) and math.isnan(s)


def test_eval_metrics_keys_and_values():
    rewards = [1.0, 3.0, 2.0, 6.0]
    groups = [0, 0, 1, 1]
    comps = {"aesthetic": [5.0, 5.0, 6.0, 8.0], "clip_score": [20.0, 30.0, 40.0, 50.0]}
    img = torch.stack([E1, E2, E3, E3])
    txt = torch.stack([E1, E1, E3, E2])
    out = eval_metrics(rewards, groups, comps, img, txt)
    assert out["eval_reward_mean"] == pytest.approx(3.0)
    assert out["eval_reward_std"] == pytest.approx(math.sqrt((4 + 0 + 1 + 9) / 4))
    assert out["eval_best_of_k"] == pytest.approx((3.0 + 6.0) / 2)
    assert out["eval_reward_mean/aesthetic"] == pytest.approx(6.0)
    assert out["eval_reward_std/aesthetic"] == pytest.approx(math.sqrt((1 + 1 + 0 + 4) / 4))
    assert out["eval_reward_mean/clip_score"] == pytest.approx(35.0)
    assert out["eval_clip_score"] == pytest.approx((100 + 0 + 100 + 0) / 4)
    assert out["eval_diversity"] == pytest.approx((1.0 + 0.0) / 2)
    without_clip = eval_metrics(rewards, groups)
    assert "eval_clip_score" not in without_clip and "eval_diversity" not in without_clip


def test_tiny_eval_clip_agrees_with_the_clip_score_reward(tmp_path):
    from raft_diffusion.diffusion.metrics import load_eval_clip
    from raft_diffusion.diffusion.tiny import ensure_tiny_clip
    from reward_models import load_reward

    folder = ensure_tiny_clip(tmp_path)
    assert ensure_tiny_clip(tmp_path) == folder  # built once
    clip = load_eval_clip(str(folder), None)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(6, 3, 32, 32, generator=g)
    prompts = ["a red square", "a blue circle"] * 3
    img, txt = clip.image_embeddings(images), clip.text_embeddings(prompts)
    assert img.shape == (6, 16) and txt.shape == (6, 16)
    assert torch.equal(txt[0], txt[2])  # one embedding per distinct prompt
    reference = load_reward("clip_score", clip_model=str(folder), clip_pretrained=None)(images, prompts)
    assert clip_scores(img, txt).tolist() == pytest.approx(reference.tolist(), abs=1e-4)
    assert reference.max() > 0  # not all clipped to zero
    assert diversity(clip.image_embeddings(images[:1].repeat(3, 1, 1, 1)), [0, 0, 0]) == pytest.approx(0.0, abs=1e-6)
    assert diversity(img, [0, 1] * 3) > 1e-3  # different images are apart
