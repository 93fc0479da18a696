#!/usr/bin/env python
"""Benchmark a RAFT run on the toy world: one table of base, each stage, and base best-of-K.

    python scripts/bench_toyworld.py [--config configs/toy_aesthetic_fast.yaml] [--run-dir runs/toy_aesthetic_fast]

Runs ``raft-diffusion align`` first when the run directory has no finished run. Every figure is measured on the
run's held-out prompts and fixed eval seeds (the PNGs each stage wrote under ``stages/NNN/eval``):

- proxy: the run's reward (from ``eval.jsonl``); its rise in units of the base model's per-image std, with a
  bootstrap 95% interval (``proxy_rise_sd_ci``: the same resampled slots for the stage and the base, the base's std
  recomputed on each resample, so the interval holds the draw of the base's 128 images too);
- gold: the pixel oracle's estimate of the hidden gold aesthetic, with the paired rise over the base and a
  bootstrap 95% interval (same prompt and seed, resampled over samples);
- fidelity: share of samples whose subject has the prompt's shape and colour (oracle);
- diversity: mean pairwise cosine distance of toy-CLIP image embeddings among samples of a prompt, as a ratio
  to the base model's.
The last row is best-of-K from the base model (K fresh samples per eval slot, the best by the proxy). The bars
are checked on the stage the run delivers as ``final/``: the last stage, or the one early stop kept.

Toy-world configs only (an SD 1.x pipeline at 32 px): the oracle and the best-of-K row read that model's images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raft_diffusion.diffusion.metrics import diversity  # noqa: E402
from raft_diffusion.diffusion.toyworld.oracle import oracle_metrics  # noqa: E402


def _load_rows(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "eval.jsonl").read_text().splitlines() if line.strip()]


def _load_images(stage_dir: Path) -> tuple[list[dict], torch.Tensor]:
    rows = _load_rows(stage_dir)
    ims = [np.asarray(Image.open(stage_dir / r["image"]).convert("RGB")) for r in rows]
    return rows, torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 255.0


def _bootstrap(diff: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n, len(diff)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _bootstrap_rise_sd(proxy: np.ndarray, base: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of ``(mean(proxy) - mean(base)) / std(base)`` over resamples of the (prompt, seed) slots."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), size=(n, len(base)))
    b = base[idx]
    sd = b.std(1)
    rises = (proxy[idx].mean(1) - b.mean(1)) / np.where(sd > 0, sd, np.nan)
    return float(np.nanpercentile(rises, 2.5)), float(np.nanpercentile(rises, 97.5))


def load_embedder(clip_model: str | None):
    """The toy-CLIP image embedder diversity is measured with: ``eval.clip_model``, else the toy world's CLIP."""
    from reward_models import load_reward

    clip_dir = clip_model or str(ROOT / "raft_diffusion/diffusion/toyworld/assets/clip")
    return load_reward("clip_score", clip_model=clip_dir, clip_pretrained=None).backbone


def image_figures(images: torch.Tensor, rows: list[dict], embedder) -> dict:
    """Held-out images (``[N, 3, H, W]`` in [0, 1]) with their ``eval.jsonl``-style rows (``prompt``, ``prompt_index``,
    ``reward``): per-image ``proxy``, ``gold`` and ``fidelity`` arrays and the images' ``diversity``."""
    m = oracle_metrics(images, [r["prompt"] for r in rows])
    with torch.no_grad():
        emb = embedder.encode_images(images)
    return {
        "proxy": np.asarray([r["reward"] for r in rows]),
        "gold": m["aesthetic"],
        "fidelity": m["match"].astype(float),
        "diversity": diversity(emb, [r["prompt_index"] for r in rows]),
    }


def measure(run: Path, best_of_k: int = 0, *, embedder=None) -> list[dict]:
    """The table of a finished run: base, each evaluated stage and (``best_of_k`` > 0) base best-of-K; one dict a
    row with the figures above (``proxy_rise_sd`` and ``proxy_rise_sd_ci``, ``gold_rise`` and ``gold_rise_ci``,
    ``fidelity``, ``diversity_ratio``)."""
    import yaml

    from reward_models import load_reward_from_config

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    if embedder is None:
        embedder = load_embedder(cfg["eval"].get("clip_model"))
    stages = sorted(int(p.name) for p in (run / "stages").iterdir() if (p / "eval.jsonl").is_file())
    if not stages or stages[0] != 0:
        raise SystemExit(f"error: {run} has no stage-0 (base) evaluation")

    table = []
    base = None
    for st in stages:
        rows, images = _load_images(run / "stages" / f"{st:03d}")
        rec = {"row": "base" if st == 0 else f"stage {st}", **image_figures(images, rows, embedder), "rows": rows}
        if base is None:
            base = rec
        table.append(rec)

    if best_of_k:
        from raft_diffusion.diffusion.families import detect_family
        from raft_diffusion.diffusion.pipeline import load_pipeline
        from raft_diffusion.diffusion.toyworld.sd import sample

        family = detect_family(cfg["model"]["pretrained"], cfg["model"].get("family"))  # sd/ or the flow miniature's sd3/
        pipe = load_pipeline(cfg["model"]["pretrained"], device="cpu", dtype="fp32", family=family)
        reward = load_reward_from_config(cfg["reward"], device="cpu")
        from raft_diffusion.diffusion.config import load_config

        run_cfg = load_config(run / "config.yaml")  # best-of-K at the held-out samples' setting
        guidance, steps = run_cfg.eval_guidance_scale, run_cfg.eval_num_inference_steps
        n_seq = run_cfg.model.max_sequence_length  # the flow miniature's zero "T5" rows, as the run sampled
        extra = {} if n_seq is None else {"max_sequence_length": n_seq}
        best_imgs, best_rows = [], []
        for j, r in enumerate(base["rows"]):
            seeds = [10_000_000 + j * best_of_k + k for k in range(best_of_k)]
            ims = sample(pipe, [r["prompt"]] * best_of_k, seeds, steps=steps, guidance=guidance, **extra)
            sc = reward(ims, [r["prompt"]] * best_of_k).float()
            b = int(torch.nan_to_num(sc, nan=-1e9).argmax())
            best_imgs.append(ims[b])
            best_rows.append({**r, "reward": float(sc[b])})
        figures = image_figures(torch.stack(best_imgs), best_rows, embedder)
        table.append({"row": f"base best-of-{best_of_k}", **figures, "rows": base["rows"]})

    sd = float(base["proxy"].std())
    out = []
    for rec in table:
        d = rec["gold"] - base["gold"]
        lo, hi = _bootstrap(d)
        dz = (rec["proxy"].mean() - base["proxy"].mean()) / sd if sd > 0 else float("nan")
        div = rec["diversity"] / base["diversity"] if base["diversity"] > 0 else float("nan")
        out.append(
            {
                "row": rec["row"],
                "images": len(rec["rows"]),
                "proxy": float(rec["proxy"].mean()),
                "proxy_rise_sd": float(dz),
                "proxy_rise_sd_ci": list(_bootstrap_rise_sd(rec["proxy"], base["proxy"])),
                "gold": float(rec["gold"].mean()),
                "gold_rise": float(d.mean()),
                "gold_rise_ci": [lo, hi],
                "fidelity": float(rec["fidelity"].mean()),
                "diversity_ratio": float(div),
            }
        )
    return out


def bars(row: dict, base: dict) -> dict[str, bool]:
    """The four bars a delivered stage must meet (``row`` and ``base`` are rows of :func:`measure`)."""
    return {
        "proxy rises >= 1 base sd": row["proxy_rise_sd"] >= 1.0,
        "gold rises (95% CI above 0)": row["gold_rise_ci"][0] > 0,
        "fidelity falls <= 3 points": row["fidelity"] >= base["fidelity"] - 0.03,
        "diversity >= 70% of base": row["diversity_ratio"] >= 0.7,
    }


def delivered(run: Path, out: list[dict]) -> dict | None:
    """The row of the stage the run delivers as final/: the one early stop kept, else the last evaluated stage."""
    from raft_diffusion.core.early_stop import read_stop

    stage_rows = [o for o in out if o["row"].startswith("stage")]
    if not stage_rows:
        return None
    stop = read_stop(run)
    return next((o for o in stage_rows if stop and o["row"] == f"stage {stop['final_stage']}"), stage_rows[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "toy_aesthetic_fast.yaml"), help="default: the demo's preset")
    ap.add_argument("--run-dir", default=None, help="default: runs/<config name>")
    ap.add_argument("--best-of-k", type=int, default=8, help="K of the base best-of-K row (0 skips it)")
    ap.add_argument("--json", default=None, help="also write the table as JSON")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides passed to align")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = Path(args.run_dir or ROOT / "runs" / Path(args.config).stem)
    if not (run / "final").is_dir():
        from raft_diffusion.cli import main as cli_main

        rc = cli_main(["align", "--config", args.config, "--output-dir", str(run), *args.overrides])
        if rc:
            return rc
    out = measure(run, args.best_of_k)
    base = out[0]
    n_prompts = len({r["prompt"] for r in _load_rows(run / "stages" / "000")})
    print(f"toy world bench: {run}  ({base['images']} eval images: {n_prompts} held-out prompts x fixed seeds)")
    print(f"{'':16s} {'proxy':>8s} {'d/sd [95% CI]':>20s} {'gold':>6s} {'d gold [95% CI]':>24s} {'fidelity':>9s} {'divers.':>8s}")
    for o in out:
        (lo, hi), d = o["gold_rise_ci"], o["gold_rise"]
        (plo, phi), dz = o["proxy_rise_sd_ci"], o["proxy_rise_sd"]
        print(
            f"{o['row']:16s} {o['proxy']:8.3f} {f'{dz:+.2f} [{plo:+.2f}, {phi:+.2f}]':>20s} {o['gold']:6.2f} "
            f"{f'{d:+.2f} [{lo:+.2f}, {hi:+.2f}]':>24s} {o['fidelity']:9.3f} {o['diversity_ratio']:8.2f}"
        )
    last = delivered(run, out)
    if last is not None:
        from raft_diffusion.core.early_stop import read_stop

        stop = read_stop(run)
        if stop:
            print(f"early stop after stage {stop['stopped_after_stage']}: {stop['reason']}")
        print(f"final ({last['row']}): " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in bars(last, base).items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
