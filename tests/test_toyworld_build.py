"""A miniature toy world built from scratch (every part briefly trained), loaded by the real loaders."""
import json

import numpy as np
import pytest
import torch

from raft_diffusion.toyworld.build import BuildSettings, build
from raft_diffusion.toyworld.world import caption, render_batch, sample_scenes, to_tensor

pytestmark = pytest.mark.slow  # about a minute on one core


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("toyworld")
    info = build(out, BuildSettings.miniature(), log=lambda m: None)
    return out, info


def test_build_writes_every_part(world):
    out, info = world
    for rel in ("clip/open_clip_config.json", "clip/open_clip_model.safetensors", "aesthetic_head.safetensors",
                "sd/model_index.json", "sd/unet", "sd/vae", "sd/text_encoder", "sd/tokenizer/tokenizer_config.json",
                "prompts_train.txt", "prompts_eval.txt"):
        assert (out / rel).exists(), rel
    saved = json.loads((out / "build_info.json").read_text())
    assert saved["settings"]["clip_steps"] == BuildSettings.miniature().clip_steps
    # even a minute of training learns colour (the easiest attribute) far above chance (0.2)
    assert info["rewards"]["zero_shot_colour"] > 0.6
    assert info["sd"]["vae"]["recon_mae"] < 0.35


def test_rewards_load_with_the_real_loaders(world):
    from reward_models import load_reward

    out, _ = world
    clip = load_reward("clip_score", clip_model=str(out / "clip"), clip_pretrained=None, clip_at_zero=False)
    aes = load_reward("aesthetic", clip_model=str(out / "clip"), clip_pretrained=None,
                      weights=str(out / "aesthetic_head.safetensors"))
    scenes = sample_scenes(16, seed=5)
    images = to_tensor(render_batch(scenes))
    caps = [caption(s) for s in scenes]
    a = aes(images, caps)
    assert a.shape == (16,) and torch.isfinite(a).all() and a.std() > 0
    matched = clip(images, caps)
    shuffled = clip(images, caps[1:] + caps[:1])
    assert matched.mean() > shuffled.mean()


def test_pipeline_loads_and_generates(world):
    from raft_diffusion.diffusion.pipeline import load_pipeline
    from raft_diffusion.toyworld.sd import sample

    out, _ = world
    pipe = load_pipeline(str(out / "sd"), device="cpu", dtype="fp32")
    assert pipe.unet.dtype == torch.float32 and pipe.tokenizer.model_max_length == 77
    a = sample(pipe, ["a red circle", "a blue square"], [0, 1], steps=4)
    b = sample(pipe, ["a red circle", "a blue square"], [0, 1], steps=4)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    assert np.isfinite(a.numpy()).all()
