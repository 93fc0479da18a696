"""A miniature toy world built from scratch (every part briefly trained), loaded by the real loaders.

The build takes ~80 s on 2 cores, so the tests that need it are slow (``pytest -m slow``)."""

import json

import numpy as np
import pytest
import torch

from raft_diffusion.diffusion.toyworld.build import BuildSettings, build
from raft_diffusion.diffusion.toyworld.world import caption, render_batch, sample_scenes, to_tensor


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The miniature build, with the two parts in parallel processes as `toyworld build` runs them (~80 s)."""
    out = tmp_path_factory.mktemp("toyworld")
    info = build(out, BuildSettings.miniature(), log=lambda m: None, jobs=2)
    return out, info


@pytest.mark.slow
def test_build_writes_every_part(world):
    out, info = world
    for rel in (
        "clip/open_clip_config.json",
        "clip/open_clip_model.safetensors",
        "aesthetic_head.safetensors",
        "sd/model_index.json",
        "sd/unet",
        "sd/vae",
        "sd/text_encoder",
        "sd/tokenizer/tokenizer_config.json",
        "prompts_train.txt",
        "prompts_eval.txt",
    ):
        assert (out / rel).exists(), rel
    saved = json.loads((out / "build_info.json").read_text())
    assert saved["settings"]["clip_steps"] == BuildSettings.miniature().clip_steps
    assert saved["jobs"] == 2 and saved["wall_seconds"] > 0
    # even a minute of training learns colour (the easiest attribute) far above chance (0.2)
    assert info["rewards"]["zero_shot_colour"] > 0.6
    assert info["sd"]["vae"]["recon_mae"] < 0.35


@pytest.mark.slow
def test_rewards_load_with_the_real_loaders(world):
    from reward_models import load_reward

    out, _ = world
    clip = load_reward("clip_score", clip_model=str(out / "clip"), clip_pretrained=None, clip_at_zero=False)
    aes = load_reward("aesthetic", clip_model=str(out / "clip"), clip_pretrained=None, weights=str(out / "aesthetic_head.safetensors"))
    scenes = sample_scenes(16, seed=5)
    images = to_tensor(render_batch(scenes))
    caps = [caption(s) for s in scenes]
    a = aes(images, caps)
    assert a.shape == (16,) and torch.isfinite(a).all() and a.std() > 0
    matched = clip(images, caps)
    shuffled = clip(images, caps[1:] + caps[:1])
    assert matched.mean() > shuffled.mean()


@pytest.mark.slow
def test_pipeline_loads_and_generates(world):
    from raft_diffusion.diffusion.pipeline import load_pipeline
    from raft_diffusion.diffusion.toyworld.sd import sample

    out, _ = world
    pipe = load_pipeline(str(out / "sd"), device="cpu", dtype="fp32")
    assert pipe.unet.dtype == torch.float32
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 24
    a = sample(pipe, ["a red circle", "a blue square"], [0, 1], steps=4)
    b = sample(pipe, ["a red circle", "a blue square"], [0, 1], steps=4)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    assert np.isfinite(a.numpy()).all()


@pytest.mark.slow
def test_text_encoder_is_the_toy_clips_text_tower(world):
    """SD conditions on its CLIP's text tower: the saved encoder reproduces the CLIP's text embeddings."""
    from raft_diffusion.diffusion.pipeline import load_pipeline
    from reward_models import load_reward

    out, _ = world
    clip = load_reward("clip_score", clip_model=str(out / "clip"), clip_pretrained=None).backbone.model.float()
    pipe = load_pipeline(str(out / "sd"), device="cpu", dtype="fp32")
    texts = ["a small red circle in the centre on a noisy gray background", "a blue cross"]
    ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = pipe.text_encoder(ids).pooler_output @ clip.text_projection
        theirs = clip.encode_text(ids)
    # both sides hold fp16-rounded weights; a random text tower would be off by O(1)
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=2e-3)
    assert ours.std() > 0.1


def test_sd_part_alone_needs_the_clip(tmp_path):
    from raft_diffusion.core.errors import UserError

    with pytest.raises(UserError, match="--parts rewards"):
        build(tmp_path, BuildSettings.miniature(), parts=("sd",), log=lambda m: None)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--threads", "-1"], "error: --threads must be >= 1, or 0 for torch's default (got -1)"),
        (["--out", "FILE"], "error: --out FILE is a file, not a folder; choose another --out"),
    ],
)
def test_bad_build_options_are_one_line_before_any_training(tmp_path, capsys, argv, message):
    from raft_diffusion.cli import main

    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / a) if a == "FILE" else a for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "w")]
    assert main(["toyworld", "build", "--parts", "rewards", "--jobs", "1", "--miniature", *out, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == message.replace("FILE", str(tmp_path / "FILE")) and not (tmp_path / "w").exists()
