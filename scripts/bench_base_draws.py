#!/usr/bin/env python
"""How much the toy world's yardstick moves with the draw of the base model's held-out images.

``scripts/bench_toyworld.py`` measures every stage against the base model's images at the run's own eval seeds
(``eval.num_per_prompt`` fixed seeds per held-out prompt, derived from the run's ``seed``): the proxy rise is in
units of that draw's std, the gold rise is over that draw's gold, and diversity is a share of that draw's. This
script draws the base's held-out images at the eval seeds of run seeds 0..N-1 (the same prompts, sampler and
guidance as a run of ``--config``), measures each draw as the bench measures the base row (proxy mean and std, the
oracle's gold and fidelity, toy-CLIP diversity), and prints where ``--seed``'s draw sits among them, and what a
bar set on that draw (``--rise-sd``, ``--diversity-ratio``) asks of a model in units of all N draws together.

    python scripts/bench_base_draws.py [--config configs/toy_aesthetic_max.yaml] [--draws 16] [--seed 0]

One thread; about 15 CPU seconds a draw of 128 images. Last line: ``goal_rise_in_pooled_sd: <the proxy a model needs
to rise --rise-sd on --seed's draw, in units of the pooled draws' std above their mean>``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure_draws(config: str, draws: int, overrides=(), progress: bool = True) -> list[dict]:
    """One dict per run seed 0..draws-1: ``proxy`` (mean), ``proxy_std``, ``gold``, ``fidelity``, ``diversity``
    of the base model's held-out images at that seed's eval seeds, measured as bench_toyworld measures them."""
    from bench_toyworld import image_figures, load_embedder

    from raft_diffusion.core.seeds import eval_seed
    from raft_diffusion.diffusion.config import load_config
    from raft_diffusion.diffusion.task import DiffusionTask

    cfg = load_config(config, list(overrides))
    cfg.progress = progress
    task = DiffusionTask(cfg)
    embedder = load_embedder(cfg.eval.clip_model)
    n = cfg.eval.num_per_prompt
    out = []
    for seed in range(draws):
        todo = [(p, k, eval_seed(seed, p, k)) for p in range(len(task.eval_prompts)) for k in range(n)]
        rows, images_u8, _ = task._held_out(todo, f"draw {seed}")
        images = torch.cat(images_u8).float() / 255.0  # what bench_toyworld reads back from the PNGs
        f = image_figures(images, rows, embedder)
        out.append(
            {
                "seed": seed,
                "proxy": float(f["proxy"].mean()),
                "proxy_std": float(f["proxy"].std()),
                "gold": float(f["gold"].mean()),
                "fidelity": float(f["fidelity"].mean()),
                "diversity": f["diversity"],
            }
        )
    return out


def pooled(draws: list[dict]) -> dict:
    """The draws' figures together: mean of each, the spread of the means, and the proxy's std over every image
    (the draws are equal in size, so the pooled variance is the mean within-draw variance plus the variance of
    the draw means)."""
    means = [d["proxy"] for d in draws]
    mu = statistics.fmean(means)
    within = statistics.fmean(d["proxy_std"] ** 2 for d in draws)
    between = statistics.fmean((m - mu) ** 2 for m in means)
    out = {"proxy": mu, "proxy_std": (within + between) ** 0.5}
    for key in ("proxy", "gold", "fidelity", "diversity"):
        vals = [d[key] for d in draws]
        out[f"{key}_mean"] = statistics.fmean(vals)
        out[f"{key}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "toy_aesthetic_max.yaml"))
    ap.add_argument("--draws", type=int, default=16, help="run seeds 0..N-1 (default 16)")
    ap.add_argument("--seed", type=int, default=None, help="the draw to place among the others (default: the config's seed)")
    ap.add_argument("--rise-sd", type=float, default=1.45, help="a proxy bar in the --seed draw's std (default: issue 24's 1.45)")
    ap.add_argument("--diversity-ratio", type=float, default=0.5, help="a diversity bar as a share of the --seed draw's (default 0.5)")
    ap.add_argument("--json", default=None, help="also write the draws and the pooled figures as JSON")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    if args.draws < 2:
        raise SystemExit(f"error: --draws must be at least 2 to measure a spread (got {args.draws})")
    torch.set_num_threads(1)
    from raft_diffusion.diffusion.config import load_config

    seed = load_config(args.config, args.overrides).seed if args.seed is None else args.seed
    if not 0 <= seed < args.draws:
        raise SystemExit(f"error: --seed {seed} is not among the draws 0..{args.draws - 1}: raise --draws")
    draws = measure_draws(args.config, args.draws, args.overrides)
    pool = pooled(draws)
    print(f"base model's held-out images, {args.draws} draws (run seeds 0..{args.draws - 1}) of {args.config}")
    print(f"{'seed':>5s} {'proxy':>7s} {'std':>6s} {'gold':>6s} {'fidelity':>9s} {'divers.':>8s}")
    for d in draws:
        mark = "  <- --seed" if d["seed"] == seed else ""
        print(f"{d['seed']:5d} {d['proxy']:7.3f} {d['proxy_std']:6.3f} {d['gold']:6.3f} {d['fidelity']:9.3f} {d['diversity']:8.4f}{mark}")
    print(
        f"pooled: proxy {pool['proxy']:.3f} (std over all images {pool['proxy_std']:.3f}; draw means spread {pool['proxy_sd']:.3f}), "
        f"gold {pool['gold_mean']:.3f} (spread {pool['gold_sd']:.3f}), diversity {pool['diversity_mean']:.4f} (spread {pool['diversity_sd']:.4f})"
    )
    me = draws[seed]
    z = {k: (me[k] - pool[f"{k}_mean"]) / pool[f"{k}_sd"] if pool[f"{k}_sd"] > 0 else 0.0 for k in ("proxy", "gold", "diversity")}
    rank = sorted((d["diversity"] for d in draws), reverse=True).index(me["diversity"]) + 1
    print(
        f"seed {seed}'s draw: proxy {z['proxy']:+.2f}, gold {z['gold']:+.2f}, diversity {z['diversity']:+.2f} spreads from the "
        f"draws' mean (diversity {rank} of {args.draws} from the top)"
    )
    need_proxy = me["proxy"] + args.rise_sd * me["proxy_std"]
    need_div = args.diversity_ratio * me["diversity"]
    rise_pooled = (need_proxy - pool["proxy"]) / pool["proxy_std"]
    print(
        f"a rise of {args.rise_sd:+.2f} sd on seed {seed}'s draw is a mean proxy of {need_proxy:.3f}, {rise_pooled:+.2f} pooled sd; "
        f"diversity {args.diversity_ratio:.2f} of its draw is {need_div:.4f}, {need_div / pool['diversity_mean']:.3f} of the pooled mean"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"draws": draws, "pooled": pool, "seed": seed}, indent=2) + "\n")
    print(f"goal_rise_in_pooled_sd: {rise_pooled:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
