#!/usr/bin/env python
"""Learning curve of the toy world's flow-matching miniature, on the build's own training path.

    OMP_NUM_THREADS=1 python scripts/flow_diagnostics.py --out runs/flowdiag --steps 4000 --eval-every 500
    OMP_NUM_THREADS=1 python scripts/flow_diagnostics.py --out runs/flowdiag --steps 4000 --resume runs/flowdiag/state.pt

Trains the transformer exactly as ``raft-diffusion toyworld build --only flow`` does with the same settings (same
seeded initialisation, pool and batches: ``toyworld.flow.pretrain_flow``), on the committed (or ``--assets``) CLIP
and VAE, and every ``--eval-every`` steps measures the EMA model that the build would save at that point:

- ``val``, ``shape_gap``, ``colour_gap`` (``toyworld.flow.caption_gaps``): its velocity loss on 128 fixed training
  latents and how much it rises when the caption's shape or colour word is swapped: a model that draws no shape
  has a shape gap near 0;
- the oracle's shape+colour match on ``--eval-prompts`` held-out prompts at the build's guidance (the build's
  quality figure uses 100), and the gold aesthetic's mean and std;

and writes a JSON line of them to ``OUT/curve.jsonl`` (with process CPU seconds and the load average), a grid of the
samples to ``OUT/grid_STEP.png``, and the training state to ``OUT/state.pt`` (``--resume`` continues from it on the
same trajectory). The learning-rate schedule spans ``--steps``, so a curve's points before the end are not what a
build of that many steps gives; its last point is.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raft_diffusion.diffusion.toyworld.build import ASSETS_DIR, BuildSettings  # noqa: E402


def flow_defaults() -> tuple[int, int, int]:
    from raft_diffusion.diffusion.toyworld.flow import FLOW_HEAD_DIM, FLOW_HEADS, FLOW_LAYERS

    return FLOW_LAYERS, FLOW_HEADS, FLOW_HEAD_DIM


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    d = BuildSettings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (curve.jsonl, grids, state.pt)")
    ap.add_argument("--assets", default=str(ASSETS_DIR), help="a built toy world folder with clip/ and sd/")
    ap.add_argument("--steps", type=int, default=d.flow_steps, help="training steps (the schedule's length)")
    ap.add_argument("--batch", type=int, default=d.flow_batch)
    ap.add_argument("--pool", type=int, default=d.flow_pool)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay of the saved weights")
    ap.add_argument("--sigma-mean", type=float, default=0.0, help="logit-normal mean of the training noise levels (> 0: noisier)")
    ap.add_argument("--sigma-std", type=float, default=1.0, help="logit-normal std of the training noise levels")
    ap.add_argument("--layers", type=int, default=flow_defaults()[0], help="MMDiT blocks")
    ap.add_argument("--heads", type=int, default=flow_defaults()[1], help="attention heads")
    ap.add_argument("--head-dim", type=int, default=flow_defaults()[2], help="width of a head")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-prompts", type=int, default=48)
    ap.add_argument("--eval-raw", action="store_true", help="also measure the oracle match of the live (not averaged) weights")
    ap.add_argument("--resume", default=None, help="a state.pt this script wrote (same settings)")
    args = ap.parse_args(argv)
    from raft_diffusion.core.errors import UserError

    if min(args.steps, args.eval_every, args.eval_prompts, args.layers, args.heads, args.head_dim) < 1:
        raise UserError("--steps, --eval-every, --eval-prompts, --layers, --heads and --head-dim must be >= 1")
    from diffusers import AutoencoderKL
    from torchvision.utils import save_image

    from raft_diffusion.diffusion.tiny import build_clip_tokenizer
    from raft_diffusion.diffusion.toyworld import flow
    from raft_diffusion.diffusion.toyworld.sd import encode_pool, evaluate_pipeline

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    assets = Path(args.assets)
    c0, w0 = _cpu(), time.time()
    # as build_flow: the seed, the shared VAE, the projected text tower, the pool
    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(str(assets / "sd" / "vae"), torch_dtype=torch.float32).eval()
    te = flow.load_text_encoder_with_projection(assets / "clip")
    tok = build_clip_tokenizer()
    tok.model_max_length = te.config.max_position_embeddings
    pipe = flow.build_flow_pipeline(vae, te, tok, args.seed, layers=args.layers, heads=args.heads, head_dim=args.head_dim)
    (out / "settings.json").write_text(json.dumps(vars(args), indent=1) + "\n")
    pool = encode_pool(vae, args.pool, args.seed + 17)
    resume = torch.load(args.resume, weights_only=False) if args.resume else None

    def hook(step: int, live: dict) -> None:
        torch.save(flow.training_state(live, step), out / "state.pt")
        c = _cpu()
        ema = live["ema"]
        row = {"step": step, **flow.caption_gaps(ema, pipe, pool)}
        pipe.transformer = ema
        try:
            ev = evaluate_pipeline(pipe, n_prompts=args.eval_prompts, seed=args.seed, guidance=flow.EVAL_GUIDANCE, max_sequence_length=flow.T5_TOKENS)
        finally:
            pipe.transformer = live["model"]
        save_image(ev.pop("images")[:48], str(out / f"grid_{step}.png"), nrow=8)
        ev.pop("prompt_list")
        row.update(ev)
        if args.eval_raw:  # the live weights too (what the EMA lags behind)
            model = live["model"].eval()
            try:
                raw = evaluate_pipeline(
                    pipe, n_prompts=args.eval_prompts, seed=args.seed, guidance=flow.EVAL_GUIDANCE, max_sequence_length=flow.T5_TOKENS
                )
            finally:
                model.train()
            row.update(raw_match=raw["match"], raw_shape_ok=raw["shape_ok"], raw_colour_ok=raw["colour_ok"])
        row.update(eval_cpu_s=_cpu() - c, cpu_s=_cpu() - c0, wall_s=time.time() - w0, load=os.getloadavg()[0])
        with open(out / "curve.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    flow.pretrain_flow(
        pipe,
        pool,
        args.steps,
        args.batch,
        args.seed,
        lambda m: print(m, flush=True),
        lr=args.lr,
        hook=hook,
        hook_every=args.eval_every,
        resume=resume,
        ema_decay=args.ema_decay,
        sigma_mean=args.sigma_mean,
        sigma_std=args.sigma_std,
    )
    print(f"done: {_cpu() - c0:.0f} CPU s, {time.time() - w0:.0f} s wall, load {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
