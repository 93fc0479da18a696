"""sampling.prune_step / prune_keep: each prompt's samples judged half-way, only the best finished."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from raft_diffusion.core.config import ConfigError
from raft_diffusion.core.errors import UserError
from raft_diffusion.core.loop import collect_pool
from raft_diffusion.core.seeds import sample_seed
from raft_diffusion.core.types import Sample
from raft_diffusion.diffusion.config import config_from_dict, load_config
from raft_diffusion.diffusion.generate import decode_latents, denoise, generate_batch, start_latents
from raft_diffusion.diffusion.task import DiffusionTask

ROOT = Path(__file__).resolve().parents[1]
# configs/tiny.yaml (4 prompts, K=8, 4 steps, guidance 2, brightness reward, top 2) judged after 2 steps, 3 finished
PRUNE = ["sampling.prune_step=2", "sampling.prune_keep=3", "progress=false", "eval.clip_model=null"]


@pytest.fixture(scope="module")
def task(tiny_pipeline_dir):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.pretrained={tiny_pipeline_dir}", *PRUNE])
    return DiffusionTask(cfg)


def test_pruned_pool_finishes_each_prompts_best_by_hand(task):
    """By hand: every sample denoised 2 of 4 steps, its predicted image scored; the best 3 of each prompt
    finished (the pipeline's own samples), the other 5 pruned with no score; the reward asked 32 + 12 times."""
    cfg, pipe = task.cfg, task.pipe
    stats = {"reward_queries": 0}
    pool = collect_pool(cfg, task, 1, stats)
    records = {(s.prompt_index, s.sample_index): s for s in pool.records}
    assert len(records) == 32
    cond, uncond = task.train_embeds
    pipe.scheduler.set_timesteps(4)
    for p in range(4):
        seeds = [sample_seed(cfg.seed, 1, p, k) for k in range(8)]
        idx = torch.full((8,), p)
        latents, gens = start_latents(pipe, seeds, 32, 32)
        _, x0 = denoise(pipe, latents, cond[idx], uncond[idx], gens, pipe.scheduler.timesteps[:2], guidance_scale=2.0)
        provisional = task.reward(decode_latents(pipe, x0), [task.train_prompts[p]] * 8).tolist()
        best = sorted(range(8), key=lambda k: -provisional[k])[:3]
        finished = sorted(k for k in range(8) if "pruned_at_step" not in records[(p, k)].extras)
        assert finished == sorted(best)
        full, images = generate_batch(
            pipe, cond[idx[:3]], uncond[idx[:3]], [seeds[k] for k in best], num_inference_steps=4, guidance_scale=2.0, height=32, width=32
        )
        final = task.reward(images, [task.train_prompts[p]] * 3).tolist()
        for j, k in enumerate(best):
            s = records[(p, k)]
            assert s.extras["provisional_reward"] == pytest.approx(provisional[k], abs=1e-5)
            assert s.reward == pytest.approx(final[j], abs=1e-4) and s.extras["reward_queries"] == 2
            assert "discarded" not in s.extras
        for k in set(range(8)) - set(best):
            s = records[(p, k)]
            assert s.reward != s.reward and s.extras["pruned_at_step"] == 2 and s.extras["discarded"].startswith("pruned at step 2 of 4")
            assert s.extras["provisional_reward"] == pytest.approx(provisional[k], abs=1e-5)
        kept = [s for s in pool.kept() if s.prompt_index == p]
        assert sorted(s.sample_index for s in kept) == sorted(sorted(best, key=lambda k: -records[(p, k)].reward)[:2])
        latents_of = {s.sample_index: s.payload["latents"] for s in kept}
        for j, k in enumerate(best):
            if k in latents_of:  # the kept samples are the pipeline's own finished samples
                torch.testing.assert_close(latents_of[k], full[j], rtol=0, atol=1e-4)
    assert stats["reward_queries"] == 32 + 4 * 3


@pytest.mark.parametrize(
    "over, message",
    [
        (["sampling.prune_step=2"], "sampling.prune_step and sampling.prune_keep go together"),
        (["sampling.prune_step=4", "sampling.prune_keep=3"], "sampling.prune_step must be an integer in 1..3"),
        (["sampling.prune_step=2", "sampling.prune_keep=1"], "sampling.prune_keep must be an integer from 2 (ranking.top_k) to 7"),
        (["sampling.prune_step=2", "sampling.prune_keep=8"], "sampling.prune_keep must be an integer from 2 (ranking.top_k) to 7"),
    ],
)
def test_bad_prune_settings_are_one_line(over, message):
    base = ["sampling.num_inference_steps=4", "sampling.num_per_prompt=8", "ranking.top_k=2"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({}, base + over)


def test_prune_needs_a_stepwise_scheduler(tiny_pipeline_dir):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.pretrained={tiny_pipeline_dir}", *PRUNE, "sampling.scheduler=EulerDiscreteScheduler"])
    with pytest.raises(UserError, match="set sampling.scheduler to DDIMScheduler or DDPMScheduler, or sampling.prune_step=null"):
        DiffusionTask(cfg)


def _request(k, reward, direction, match=True):
    s = Sample(prompt_index=0, sample_index=k, seed=k, embedding=torch.tensor(direction, dtype=torch.float32))
    s.extras.update(provisional_reward=reward, provisional_match=match)
    return s


@pytest.mark.parametrize(
    "weights, want",
    [
        # plain top 2 of the prompt-matched: 0 and 1 (4 has the best reward but its predicted image misses its prompt)
        ({}, {0, 1}),
        # spread-out pick (weight 1): 0, then 2 (0.98 + 1 x distance 1 to sample 0) over 1 (0.99 + 0, a copy of 0)
        ({"ranking.diversity_weight": 1.0}, {0, 2}),
    ],
)
def test_survivors_are_picked_by_the_rankings_rule(weights, want):
    """By hand, one prompt: rewards 1.0, 0.99, 0.98, 0.5 and 2.0 (unmatched); 0 and 1 point the same way, 2, 3, 4
    elsewhere. Two are finished."""
    from types import SimpleNamespace

    from raft_diffusion.core.dist import Dist

    over = [
        "sampling.num_per_prompt=5",
        "sampling.prune_step=2",
        "sampling.prune_keep=2",
        "ranking.top_k=1",
        "ranking.prompt_match=1",
        "eval.clip_model=tiny",
    ]
    cfg = config_from_dict({}, over + [f"{k}={v}" for k, v in weights.items()])

    def requests(matched=(True, True, True, True, False)):
        rewards, directions = (1.0, 0.99, 0.98, 0.5, 2.0), ([1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1])
        return [_request(k, r, d, m) for k, (r, d, m) in enumerate(zip(rewards, directions, matched))]

    fake = SimpleNamespace(cfg=cfg, dist=Dist())
    assert DiffusionTask._survivors(fake, requests()) == {(0, k) for k in want}
    # too few matched: the unmatched fill up by reward
    assert DiffusionTask._survivors(fake, requests((True, False, False, False, False))) == {(0, 0), (0, 4)}


def _reference_survivors(rows, keep, spread, novelty):
    """Brute force of the survivor rule, one prompt: the prompt-matched scored samples best first; each one's gain is
    its reward + novelty x its mean cosine distance to the other matched ones; the first pick is the best gain, each
    next one the best gain + spread x its mean distance to the picks so far; then the rest by (matched, reward)."""
    nan = float("nan")
    matched = sorted((r for r in rows if r["match"] and r["reward"] == r["reward"]), key=lambda r: (-r["reward"], r["k"]))
    n = len(matched)

    def dist(a, b):
        return 1.0 - float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    gain = [r["reward"] + (novelty * sum(dist(r["e"], o["e"]) for o in matched if o is not r) / (n - 1) if n > 1 else 0.0) for r in matched]
    picks = []
    while matched and len(picks) < min(keep, n):
        best, best_score = None, nan
        for j in range(n):
            if j in picks:
                continue
            score = gain[j] + (spread * sum(dist(matched[j]["e"], matched[p]["e"]) for p in picks) / len(picks) if picks else 0.0)
            if best is None or score > best_score + 1e-12:
                best, best_score = j, score
        picks.append(best)
    chosen = [matched[j]["k"] for j in picks]
    rest = sorted(
        (r for r in rows if r["k"] not in chosen),
        key=lambda r: (not r["match"], -r["reward"] if r["reward"] == r["reward"] else float("inf"), r["k"]),
    )
    return set(chosen + [r["k"] for r in rest][: keep - len(chosen)])


@pytest.mark.parametrize("weights", [(0.0, 0.0), (0.0, 4.0), (2.0, 0.0), (1.5, 3.0)])
def test_survivors_equal_a_brute_force_reference(weights):
    """Random pools of 5 prompts x 9 samples (some off-prompt, some with no score), 4 finished per prompt, with and
    without the spread-out and novelty terms: the task's survivors are the brute force's."""
    from types import SimpleNamespace

    from raft_diffusion.core.dist import Dist

    spread, novelty = weights
    over = ["sampling.num_per_prompt=9", "sampling.prune_step=2", "sampling.prune_keep=4", "ranking.top_k=2", "ranking.prompt_match=1"]
    over += [f"ranking.diversity_weight={spread}", f"ranking.novelty_weight={novelty}", "eval.clip_model=tiny"]
    fake = SimpleNamespace(cfg=config_from_dict({}, over), dist=Dist())
    rng = np.random.default_rng(int(10 * spread + novelty))
    for _ in range(5):
        requests, want = [], set()
        for p in range(5):
            rows = []
            for k in range(9):
                reward = float("nan") if rng.random() < 0.1 else float(rng.normal())
                rows.append(
                    {"k": k, "reward": reward, "match": bool(rng.random() < 0.7), "e": rng.normal(size=4).astype(np.float32).astype(np.float64)}
                )
                s = Sample(prompt_index=p, sample_index=k, seed=k, embedding=torch.tensor(rows[-1]["e"], dtype=torch.float32))
                s.extras.update(provisional_reward=reward, provisional_match=rows[-1]["match"])
                requests.append(s)
            want |= {(p, k) for k in _reference_survivors(rows, 4, spread, novelty)}
        assert DiffusionTask._survivors(fake, requests) == want


@pytest.fixture(scope="module")
def sd3_task(tmp_path_factory):
    from raft_diffusion.diffusion.families.tiny import tiny_pipeline

    folder = tiny_pipeline("sd3", tmp_path_factory.mktemp("tiny-sd3"))
    data = {
        "model": {"pretrained": str(folder), "device": "cpu", "max_sequence_length": 8},
        "prompts": {"train": ["a red circle", "a blue square", "a green star"]},
        "sampling": {"num_per_prompt": 6, "batch_size": 8, "num_inference_steps": 4, "guidance_scale": 2.0, "height": 32, "width": 32},
        "reward": {"name": "brightness", "kwargs": {"region": [0.25, 0.25, 0.75, 0.75]}},
        "ranking": {"mode": "local", "top_k": 1},
        "eval": {"every": 0, "clip_model": None},
        "progress": False,
    }
    return DiffusionTask(config_from_dict(data, ["sampling.prune_step=2", "sampling.prune_keep=2"]))


def test_sd3_flow_sampler_split_anywhere_is_the_pipelines(sd3_task):
    """SD3's step-by-step Euler sampler: over the whole schedule the pipeline's own samples (with and without
    guidance), and split at step 2 with a sample dropped, the same samples."""
    from raft_diffusion.diffusion.families.base import seed_generators

    family, pipe, embeds = sd3_task.family, sd3_task.pipe, sd3_task.train_embeds
    seeds, prompts = [5, 6, 7], [0, 2, 0]
    for guidance in (1.0, 3.0):
        ref = family.sample(pipe, embeds, prompts, seeds, steps=4, guidance=guidance, height=32, width=32)
        timesteps, sigmas = family.sampling_schedule(pipe, 4, 32, 32)
        noise = family.initial_noise(pipe, seeds, 32, 32, generators=seed_generators(seeds))
        whole, _ = family.denoise(pipe, noise, embeds[prompts], timesteps, sigmas, guidance=guidance)
        torch.testing.assert_close(whole, ref, rtol=0, atol=1e-5)
        head, x0 = family.denoise(pipe, noise, embeds[prompts], timesteps[:2], sigmas[:3], guidance=guidance)
        assert (x0 - ref).abs().mean() < (head - ref).abs().mean()  # the prediction is nearer the end than the state
        tail, _ = family.denoise(pipe, head[[0, 2]], embeds[[0, 0]], timesteps[2:], sigmas[2:], guidance=guidance)
        torch.testing.assert_close(tail, ref[[0, 2]], rtol=0, atol=1e-5)


def test_sd3_pruned_pool_finishes_each_prompts_best_by_hand(sd3_task):
    """By hand on the tiny SD3: x - sigma v after 2 of 4 Euler steps, decoded and scored; each prompt's best 2 of 6
    finished as the pipeline samples them; the reward asked 18 + 6 times."""
    from raft_diffusion.diffusion.families.base import seed_generators

    task, family, pipe = sd3_task, sd3_task.family, sd3_task.pipe
    stats = {"reward_queries": 0}
    pool = collect_pool(task.cfg, task, 1, stats)
    records = {(s.prompt_index, s.sample_index): s for s in pool.records}
    timesteps, sigmas = family.sampling_schedule(pipe, 4, 32, 32)
    for p in range(3):
        seeds = [sample_seed(task.cfg.seed, 1, p, k) for k in range(6)]
        noise = family.initial_noise(pipe, seeds, 32, 32, generators=seed_generators(seeds))
        _, x0 = family.denoise(pipe, noise, task.train_embeds[[p] * 6], timesteps[:2], sigmas[:3], guidance=2.0)
        provisional = task.reward(family.decode(pipe, x0), [task.train_prompts[p]] * 6).tolist()
        best = sorted(range(6), key=lambda k: -provisional[k])[:2]
        assert sorted(k for k in range(6) if "pruned_at_step" not in records[(p, k)].extras) == sorted(best)
        full = family.sample(pipe, task.train_embeds, [p, p], [seeds[k] for k in best], steps=4, guidance=2.0, height=32, width=32)
        final = task.reward(family.decode(pipe, full), [task.train_prompts[p]] * 2).tolist()
        for j, k in enumerate(best):
            assert records[(p, k)].reward == pytest.approx(final[j], abs=1e-5)
            assert records[(p, k)].extras["provisional_reward"] == pytest.approx(provisional[k], abs=1e-5)
    assert stats["reward_queries"] == 18 + 3 * 2


@pytest.mark.parametrize("family, refused", [("sd", False), ("sd3", False), ("sdxl", True), ("flux", True)])
def test_prune_refuses_families_without_a_stepwise_sampler(family, refused):
    from raft_diffusion.diffusion.families.registry import get_family
    from raft_diffusion.diffusion.task import _check_family_settings

    cfg = config_from_dict(
        {}, ["sampling.num_inference_steps=4", "sampling.num_per_prompt=8", "ranking.top_k=2", "sampling.prune_step=2", "sampling.prune_keep=3"]
    )
    if refused:
        with pytest.raises(UserError, match=f"implemented for the samplers of SD 1.x/2.x and SD3, not for {family}'s: set it to null"):
            _check_family_settings(cfg, get_family(family))
    else:
        _check_family_settings(cfg, get_family(family))
