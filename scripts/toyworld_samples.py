#!/usr/bin/env python
"""Save enlarged grids of a built toy world: renders, their VAE reconstructions, and base-model samples.

python scripts/toyworld_samples.py [--assets raft_diffusion/diffusion/toyworld/assets] [--out toyworld_samples]

The toy world's own assets only (its model is an SD 1.x StableDiffusionPipeline).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raft_diffusion.diffusion.toyworld.build import ASSETS_DIR  # noqa: E402
from raft_diffusion.diffusion.toyworld.oracle import oracle_metrics  # noqa: E402
from raft_diffusion.diffusion.toyworld.sd import sample, split_captions  # noqa: E402
from raft_diffusion.diffusion.toyworld.viz import save_grid  # noqa: E402
from raft_diffusion.diffusion.toyworld.world import render_batch, sample_scenes, to_tensor  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--assets", default=str(ASSETS_DIR))
    ap.add_argument("--out", default="toyworld_samples")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from raft_diffusion.diffusion.pipeline import load_pipeline

    out = Path(args.out)
    pipe = load_pipeline(str(Path(args.assets) / "sd"), device="cpu", dtype="fp32")
    x = to_tensor(render_batch(sample_scenes(16, seed=31337)))
    with torch.no_grad():
        rec = (pipe.vae.decode(pipe.vae.encode(x * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
    print(save_grid(torch.cat([x, rec]), out / "vae_renders_then_reconstructions.png"))
    _, held = split_captions()
    prompts = held[:: max(1, len(held) // 16)][:16]
    ims = sample(pipe, prompts, list(range(len(prompts))), args.steps, args.guidance)
    m = oracle_metrics(ims, prompts)
    for i, p in enumerate(prompts):
        print(f"{i:2d} {'ok ' if m['match'][i] else 'NO '} gold {m['aesthetic'][i]:.1f}  {p}")
    print(save_grid(ims, out / "samples_heldout_full_captions.png"))
    short = [f"a {c} {s}" for s in ("circle", "square", "triangle", "cross") for c in ("red", "blue")]
    ims = sample(pipe, [p for p in short for _ in range(4)], list(range(4 * len(short))), args.steps, args.guidance)
    print(save_grid(ims, out / "samples_short_prompts.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
