"""Tiny, randomly initialised models for tests and toy worlds, built offline from configs.

Nothing in ``reward_models`` falls back to these: a test (or a toy-world script) builds one explicitly, saves
it in the real on-disk format, and points a reward at the saved files, exactly as a user would with real
weights. Requires open_clip (and transformers for the HF helpers).
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import tempfile
from pathlib import Path

import torch

TINY_OPEN_CLIP_NAME = "reward-models-tiny-clip"
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
_REGISTERED: dict = {}


def register_open_clip_config(name: str, model_cfg: dict) -> str:
    """Register ``model_cfg`` under ``name`` with open_clip's public ``add_model_config`` (a JSON file)."""
    import open_clip

    if _REGISTERED.get(name) == model_cfg and name in open_clip.list_models():
        return name
    directory = Path(tempfile.mkdtemp(prefix="reward_models_cfg_"))
    (directory / f"{name}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(directory / f"{name}.json")
    _REGISTERED[name] = copy.deepcopy(model_cfg)
    return name


def build_tiny_open_clip(seed: int = 0, model_cfg: dict | None = None, name: str = TINY_OPEN_CLIP_NAME) -> tuple[torch.nn.Module, dict]:
    """A randomly initialised open_clip CLIP from a small config; returns ``(model, model_cfg)``.

    Random weights are the point here (tests train or save them); save with ``reward_models.save_open_clip``.
    """
    import open_clip

    cfg = copy.deepcopy(model_cfg or TINY_OPEN_CLIP_CFG)
    register_open_clip_config(name, cfg)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, device="cpu")
    return model, cfg


def clip_bpe_vocab() -> tuple[dict, list]:
    """CLIP's BPE vocabulary (49408 tokens) and merges, rebuilt from the file open_clip ships."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    units = list(bytes_to_unicode().values())
    tokens = units + [u + "</w>" for u in units] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(model_max_length: int = 77):
    """A transformers ``CLIPTokenizer`` equal to OpenAI CLIP's, built offline."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def save_tiny_hf_clip(directory: str | os.PathLike, seed: int = 0, image_size: int = 32, projection_dim: int = 16) -> Path:
    """Save a tiny random transformers ``CLIPModel`` + ``CLIPProcessor`` with ``save_pretrained``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        ),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2),
        projection_dim=projection_dim,
    )
    model = CLIPModel(config)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}),
        tokenizer=build_clip_tokenizer(),
    )
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
