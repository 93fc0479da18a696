#!/usr/bin/env python
"""Measure the quality bars of a built toy world through the same loaders the real models use.

    python scripts/toyworld_quality.py [--assets raft_diffusion/diffusion/toyworld/assets] [--n 1000] [--sd-prompts 100]

- zero-shot shape / colour accuracy of the small CLIP on held-out renders (``clip_score`` reward: each image
  against its caption with the shape / colour word swapped);             bar >= 0.90 each
- Spearman of the ``aesthetic`` reward (toy head on the toy CLIP) against gold on held-out renders; bar >= 0.80
- if ``sd/`` exists: oracle shape+colour match of base samples for held-out prompts (bar >= 0.60) and the spread
  of their gold aesthetic.
- if ``sd3/`` exists (the flow-matching miniature): the same figures for it (bar >= 0.90), at its guidance.

The toy world's own assets only (its models: an SD 1.x StableDiffusionPipeline and an SD3-structured flow pipeline).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raft_diffusion.diffusion.toyworld.build import ASSETS_DIR  # noqa: E402
from raft_diffusion.diffusion.toyworld.clip import spearman, zero_shot_by_reward  # noqa: E402
from raft_diffusion.diffusion.toyworld.world import caption, gold_aesthetic, render_batch, sample_scenes, to_tensor  # noqa: E402

HELD_OUT_SEED = 987_654  # scenes never drawn by the build (it uses seeds derived from the build seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--assets", default=str(ASSETS_DIR), help="a built toy world folder")
    ap.add_argument("--n", type=int, default=1000, help="held-out renders")
    ap.add_argument("--sd-prompts", type=int, default=100, help="held-out prompts for the text-to-image model (0 skips)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from reward_models import load_reward

    assets = Path(args.assets)
    clip_dir = str(assets / "clip")
    clip_score = load_reward("clip_score", clip_model=clip_dir, clip_pretrained=None, clip_at_zero=False)
    aesthetic = load_reward("aesthetic", clip_model=clip_dir, clip_pretrained=None, weights=str(assets / "aesthetic_head.safetensors"))
    scenes = sample_scenes(args.n, seed=HELD_OUT_SEED)
    images = to_tensor(render_batch(scenes))
    acc = zero_shot_by_reward(clip_score, scenes, images)
    pred = aesthetic(images, [caption(s) for s in scenes]).numpy()
    gold = np.array([gold_aesthetic(s) for s in scenes])
    fig = {"zero_shot_shape": acc["shape"], "zero_shot_colour": acc["colour"], "head_spearman": spearman(pred, gold)}
    rows = [
        ("CLIP zero-shot shape accuracy", fig["zero_shot_shape"], ">= 0.90"),
        ("CLIP zero-shot colour accuracy", fig["zero_shot_colour"], ">= 0.90"),
        ("aesthetic head Spearman vs gold", fig["head_spearman"], ">= 0.80"),
    ]
    if args.sd_prompts and (assets / "sd" / "model_index.json").is_file():
        from raft_diffusion.diffusion.pipeline import load_pipeline
        from raft_diffusion.diffusion.toyworld.sd import evaluate_pipeline

        pipe = load_pipeline(str(assets / "sd"), device="cpu", dtype="fp32")
        ev = evaluate_pipeline(pipe, n_prompts=args.sd_prompts)
        fig.update({f"sd_{k}": v for k, v in ev.items() if k not in ("images", "prompt_list")})
        rows += [
            ("base T2I oracle match (held-out prompts)", ev["match"], ">= 0.60"),
            ("  shape ok / colour ok", f"{ev['shape_ok']:.3f} / {ev['colour_ok']:.3f}", ""),
            ("  gold aesthetic mean / std", f"{ev['gold_mean']:.2f} / {ev['gold_std']:.2f}", "std > 0.5"),
        ]
    if args.sd_prompts and (assets / "sd3" / "model_index.json").is_file():
        from raft_diffusion.diffusion.families import detect_family
        from raft_diffusion.diffusion.pipeline import load_pipeline
        from raft_diffusion.diffusion.toyworld.flow import EVAL_GUIDANCE, T5_TOKENS
        from raft_diffusion.diffusion.toyworld.sd import evaluate_pipeline

        pipe = load_pipeline(str(assets / "sd3"), device="cpu", dtype="fp32", family=detect_family(str(assets / "sd3")))
        ev = evaluate_pipeline(pipe, n_prompts=args.sd_prompts, guidance=EVAL_GUIDANCE, max_sequence_length=T5_TOKENS)
        fig.update({f"sd3_{k}": v for k, v in ev.items() if k not in ("images", "prompt_list")})
        rows += [
            (f"flow T2I oracle match (held-out, cfg {EVAL_GUIDANCE:g})", ev["match"], ">= 0.90"),
            ("  shape ok / colour ok", f"{ev['shape_ok']:.3f} / {ev['colour_ok']:.3f}", ""),
            ("  gold aesthetic mean / std", f"{ev['gold_mean']:.2f} / {ev['gold_std']:.2f}", "std > 0.5"),
        ]
    print(f"toy world quality ({assets}, {args.n} held-out renders)")
    for name, value, bar in rows:
        v = f"{value:.3f}" if isinstance(value, float) else value
        print(f"  {name:42s} {v:>14s}   {bar}")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
