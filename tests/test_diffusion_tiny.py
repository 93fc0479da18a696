"""The tiny pipeline and the offline CLIP tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from raft_diffusion.core.common import default_cache_dir
from raft_diffusion.diffusion import tiny


@pytest.fixture(scope="module")
def clip_tokenizer():
    return tiny.build_clip_tokenizer()


@pytest.mark.parametrize(
    "text",
    ["a photo of a cat", "An astronaut riding a horse on Mars, 4k, trending!!", "naïve café 123 don't  stop", "ship"],
)
def test_tokenizer_ids_equal_open_clip(clip_tokenizer, text):
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    expected = [reference.sot_token_id, *reference.encode(text), reference.eot_token_id]
    assert clip_tokenizer(text).input_ids == expected


def test_tokenizer_shape_and_specials(clip_tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    assert len(clip_tokenizer) == 49408
    assert clip_tokenizer.model_max_length == 77
    assert (clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id) == (49406, 49407)
    padded = clip_tokenizer("a cat", padding="max_length", truncation=True, max_length=77).input_ids
    assert len(padded) == 77 and padded[:4] == [49406, 320, 2368, 49407]
    tiny.build_clip_tokenizer(save_dir=tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert reloaded("a red truck").input_ids == clip_tokenizer("a red truck").input_ids


def test_tiny_components_are_deterministic():
    a, b = tiny.build_tiny_components(seed=0), tiny.build_tiny_components(seed=0)
    c = tiny.build_tiny_components(seed=1)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = a[name].state_dict(), b[name].state_dict(), c[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert any(not torch.equal(sa[k], sc[k]) for k in sa), name
    assert a["unet"].config.cross_attention_dim == a["text_encoder"].config.hidden_size


def test_tiny_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny_components()
    assert torch.equal(torch.rand(3), expected)


def test_ensure_tiny_pipeline_writes_once_atomically(tiny_pipeline_dir, tmp_path, monkeypatch):
    root = tiny_pipeline_dir.parent
    assert tiny_pipeline_dir.name == tiny.TINY_PIPELINE_NAME
    assert (tiny_pipeline_dir / "model_index.json").is_file()
    assert [p.name for p in root.iterdir()] == [tiny.TINY_PIPELINE_NAME]  # no temp folders left behind
    stamp = (tiny_pipeline_dir / "model_index.json").stat().st_mtime_ns
    assert tiny.ensure_tiny_pipeline(root) == tiny_pipeline_dir
    assert (tiny_pipeline_dir / "model_index.json").stat().st_mtime_ns == stamp
    index = json.loads((tiny_pipeline_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    monkeypatch.setenv("RAFT_DIFFUSION_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"


def test_saved_tiny_pipeline_matches_built_one(tiny_pipe):
    built = tiny.build_tiny_pipeline()
    loaded, fresh = tiny_pipe.unet.state_dict(), built.unet.state_dict()
    assert all(torch.equal(loaded[k], fresh[k]) for k in fresh)
    assert tiny_pipe.tokenizer.model_max_length == 77
    assert tiny_pipe.vae_scale_factor == 2
