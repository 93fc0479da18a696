"""Two stages of a preset's fine-tuning (its LoRA and train settings, a fixed kept set), on one process or under torchrun.

    python tests/dist_preset_train.py PRESET OUT.pt CHUNKS [key=value ...]
    torchrun --nproc_per_node 2 tests/dist_preset_train.py PRESET OUT.pt CHUNKS [key=value ...]

CHUNKS is a comma list of train.chunk_size values (null = the preset's own); the main process saves
{chunk_size: {trained parameter name: tensor}} to OUT.pt.
"""

import sys

import torch

from raft_diffusion.core.dist import init_dist
from raft_diffusion.core.seeds import stage_seed
from raft_diffusion.diffusion import finetune as ft
from raft_diffusion.diffusion.config import load_config
from raft_diffusion.diffusion.generate import encode_prompts
from raft_diffusion.diffusion.pipeline import load_pipeline
from raft_diffusion.diffusion.prompts import load_prompts
from raft_diffusion.diffusion.task import resolve_pretrained, train_settings

KEPT = 24  # kept samples per stage


def two_stages(pipe, cfg, dist) -> dict:
    """The trained weights after two stages of ``cfg``'s training on a fixed kept set (24 samples a stage)."""
    embeds = encode_prompts(pipe, load_prompts(cfg.prompts.train), None, do_cfg=False)[0]
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    gen = torch.Generator().manual_seed(0)
    for stage in (1, 2):
        latents = torch.randn((KEPT, *shape), generator=gen)
        prompts = torch.arange(KEPT) % embeds.shape[0]
        ft.train_unet(
            pipe, latents, embeds[prompts], **train_settings(cfg.train), seed=stage_seed(cfg.seed, stage, "train"), progress=False, dist=dist
        )
    return {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if p.requires_grad}


def main(preset: str, out: str, chunks: str, *overrides: str) -> None:
    dist = init_dist("cpu")
    cfg = load_config(preset, list(overrides))
    pipe = load_pipeline(resolve_pretrained(cfg.model.pretrained), device="cpu")
    t = cfg.train
    if t.method == "lora":
        ft.add_lora(
            pipe.unet,
            rank=t.lora_rank,
            alpha=t.lora_alpha,
            dropout=t.lora_dropout,
            target_modules=tuple(t.target_modules),
            init_seed=stage_seed(cfg.seed, 0, "lora-init"),
        )
    else:
        ft.set_full_finetune(pipe.unet)
    start = [p.detach().clone() for p in ft.trainable_parameters(pipe.unet)]
    results = {}
    for chunk in chunks.split(","):
        with torch.no_grad():  # every chunk size starts from the same weights
            for p, p0 in zip(ft.trainable_parameters(pipe.unet), start):
                p.copy_(p0)
        cfg = load_config(preset, [*overrides, f"train.chunk_size={chunk}"])
        results[cfg.train.chunk_size] = two_stages(pipe, cfg, dist)
    if dist.is_main:
        torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
