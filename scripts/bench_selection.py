#!/usr/bin/env python
"""What selection alone can reach on the toy world: plain top-n against spread-out picks (ranking.diversity_weight).

    python scripts/bench_selection.py [--config configs/toy_aesthetic_fast.yaml] [--pool 64] [--keep 4 8 16]
                                      [--weights 2 4 6]

Samples ``--pool`` images per held-out prompt from the base model (fresh seeds), scores them with the config's
reward, and for each ``--keep`` n picks n per prompt two ways: the best n by reward (what best-of-K selection
keeps), and the greedy spread-out pick of :func:`raft_diffusion.core.ranking.diverse_pick` at each weight. Each row
is a selected set, as if it were a model's samples: proxy rise in base sd (the pool's per-image std), gold rise
(pixel oracle), fidelity, and diversity as a ratio to the whole pool's, the same measures as ``bench_toyworld.py``.
The rows bound what RAFT's fine-tuning could reach if it reproduced the kept distribution exactly; comparing
them with ``bench_toyworld.py``'s stages shows how much of the selection actually reaches the model.

SD 1.x pipelines only: the toy world's model is a StableDiffusionPipeline at 32 px, and the oracle reads its images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raft_diffusion.core.ranking import diverse_pick  # noqa: E402
from raft_diffusion.diffusion.metrics import diversity  # noqa: E402
from raft_diffusion.diffusion.toyworld.oracle import oracle_metrics  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "toy_aesthetic_fast.yaml"), help="default: the demo's preset")
    ap.add_argument("--pool", type=int, default=64, help="base samples per held-out prompt")
    ap.add_argument("--keep", type=int, nargs="+", default=[4, 8, 16], help="samples picked per prompt")
    ap.add_argument("--weights", type=float, nargs="+", default=[2.0, 4.0, 6.0], help="diversity weights tried")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from raft_diffusion.diffusion.config import load_config
    from raft_diffusion.diffusion.metrics import load_eval_clip
    from raft_diffusion.diffusion.pipeline import load_pipeline
    from raft_diffusion.diffusion.prompts import load_prompts
    from raft_diffusion.diffusion.toyworld.sd import sample
    from reward_models import load_reward_from_config

    cfg = load_config(args.config)
    if max(args.keep) > args.pool:
        print(f"error: --keep {max(args.keep)} is more than --pool {args.pool}; raise --pool", file=sys.stderr)
        return 2
    pipe = load_pipeline(cfg.model.pretrained, device="cpu", dtype="fp32")
    reward = load_reward_from_config(cfg.reward, device="cpu")
    clip = load_eval_clip(cfg.eval.clip_model, cfg.eval.clip_pretrained)
    prompts = load_prompts(cfg.prompts.eval)

    # 1. One pool per held-out prompt: reward, gold, fidelity and a CLIP embedding per image.
    pools = []
    s = cfg.sampling
    for p, prompt in enumerate(tqdm(prompts, desc="base pools", unit="prompt")):
        seeds = [30_000_000 + p * 100_000 + k for k in range(args.pool)]
        ims = torch.cat(
            [
                sample(pipe, [prompt] * len(chunk), chunk, steps=s.num_inference_steps, guidance=s.guidance_scale)
                for chunk in (seeds[i : i + 32] for i in range(0, len(seeds), 32))
            ]
        )
        with torch.no_grad():
            r = reward(ims, [prompt] * len(ims)).float().numpy()
        m = oracle_metrics(ims, [prompt] * len(ims))
        pools.append({"r": r, "gold": m["aesthetic"], "match": m["match"].astype(float), "emb": clip.image_embeddings(ims)})

    def measure(picks: list[np.ndarray]) -> tuple[float, float, float, float]:
        r = np.concatenate([pl["r"][i] for pl, i in zip(pools, picks)])
        g = np.concatenate([pl["gold"][i] for pl, i in zip(pools, picks)])
        f = np.concatenate([pl["match"][i] for pl, i in zip(pools, picks)])
        emb = torch.cat([pl["emb"][torch.as_tensor(i)] for pl, i in zip(pools, picks)])
        groups = [p for p, i in enumerate(picks) for _ in i]
        return float(r.mean()), float(g.mean()), float(f.mean()), diversity(emb, groups)

    everything = [np.arange(args.pool)] * len(pools)
    r0, g0, f0, d0 = measure(everything)
    sd = float(np.concatenate([pl["r"] for pl in pools]).std())
    print(
        f"selection bench: {len(prompts)} held-out prompts x {args.pool} base samples; proxy {r0:.3f} (sd {sd:.3f}), gold {g0:.2f}, fidelity {f0:.3f}"
    )
    print(f"{'':26s} {'proxy':>7s} {'d/sd':>6s} {'d gold':>7s} {'fidelity':>9s} {'divers.':>8s}")
    for n in args.keep:
        rows = [(f"top {n} by reward", [np.argsort(-pl["r"], kind="stable")[:n] for pl in pools])]
        for w in args.weights:
            picks = []
            for pl in pools:
                order = np.argsort(-pl["r"], kind="stable")  # best first, as the pool hands them over
                picks.append(order[diverse_pick(pl["r"][order].tolist(), pl["emb"][torch.as_tensor(order)], n, w)])
            rows.append((f"spread {n}, weight {w:g}", picks))
        for name, picks in rows:
            r, g, f, d = measure(picks)
            print(f"{name:26s} {r:7.3f} {(r - r0) / sd:6.2f} {g - g0:+7.2f} {f:9.3f} {d / d0:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
