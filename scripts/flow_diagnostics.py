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
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-prompts", type=int, default=48)
    ap.add_argument("--resume", default=None, help="a state.pt this script wrote (same settings)")
    args = ap.parse_args(argv)
    from raft_diffusion.core.errors import UserError

    if args.steps < 1 or args.eval_every < 1 or args.eval_prompts < 1:
        raise UserError("--steps, --eval-every and --eval-prompts must be >= 1")
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
    pipe = flow.build_flow_pipeline(vae, te, tok, args.seed)
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
    )
    print(f"done: {_cpu() - c0:.0f} CPU s, {time.time() - w0:.0f} s wall, load {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
