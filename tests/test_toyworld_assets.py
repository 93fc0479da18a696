"""The committed toy world (raft_diffusion/diffusion/toyworld/assets) loads with the real loaders and meets its bars."""

import json

import numpy as np
import pytest

from raft_diffusion.diffusion.toyworld.build import ASSETS_DIR
from raft_diffusion.diffusion.toyworld.clip import spearman, zero_shot_by_reward
from raft_diffusion.diffusion.toyworld.world import caption, gold_aesthetic, render_batch, sample_scenes, to_tensor

SEED = 2024  # held-out renders (the build draws from seeds derived from its own seed)


@pytest.fixture(scope="module")
def rewards():
    from reward_models import load_reward

    clip = load_reward("clip_score", clip_model=str(ASSETS_DIR / "clip"), clip_pretrained=None, clip_at_zero=False)
    aes = load_reward("aesthetic", clip_model=str(ASSETS_DIR / "clip"), clip_pretrained=None, weights=str(ASSETS_DIR / "aesthetic_head.safetensors"))
    return clip, aes


def test_assets_are_complete_and_small():
    from raft_diffusion.diffusion.toyworld.flow import folder_bytes

    # the UNet world's 20.2 MB plus at most 10 MB for the flow-matching miniature (its links into sd/ add nothing)
    assert folder_bytes(ASSETS_DIR) <= 30 * 2**20
    assert folder_bytes(ASSETS_DIR / "sd3") <= 10 * 10**6
    info = json.loads((ASSETS_DIR / "build_info.json").read_text())
    assert {"rewards", "sd", "settings"} <= set(info)
    for rel in ("clip/open_clip_config.json", "aesthetic_head.safetensors", "sd/model_index.json", "prompts_train.txt", "prompts_eval.txt"):
        assert (ASSETS_DIR / rel).is_file(), rel


def test_clip_zero_shot_shape_and_colour(rewards):
    clip, _ = rewards
    scenes = sample_scenes(150, seed=SEED)
    acc = zero_shot_by_reward(clip, scenes, to_tensor(render_batch(scenes)))
    assert acc["shape"] >= 0.9 and acc["colour"] >= 0.9, acc


def test_aesthetic_head_tracks_gold(rewards):
    _, aes = rewards
    scenes = sample_scenes(300, seed=SEED + 1)
    pred = aes(to_tensor(render_batch(scenes)), [caption(s) for s in scenes]).numpy()
    assert spearman(pred, [gold_aesthetic(s) for s in scenes]) >= 0.8


def test_text_to_image_follows_prompts():
    from raft_diffusion.diffusion.pipeline import load_pipeline
    from raft_diffusion.diffusion.toyworld.oracle import oracle_metrics
    from raft_diffusion.diffusion.toyworld.sd import sample, split_captions

    pipe = load_pipeline(str(ASSETS_DIR / "sd"), device="cpu", dtype="fp32")
    _, held = split_captions()
    prompts = list(np.random.default_rng(0).choice(held, size=32, replace=False))
    m = oracle_metrics(sample(pipe, prompts, list(range(32)), steps=20), prompts)
    # the bar is 0.60 shape+colour on held-out prompts; the build measured 0.96 on 100 (build_info.json).
    # A blob-drawing model gets shape right at chance (0.25): the previous base model scored 0.21 here.
    assert m["match"].mean() >= 0.75, m["match"].mean()
    assert m["aesthetic"].std() > 0.5  # room left for alignment
