"""``raft-diffusion llm toyworld build``: train the toy text world's LM and reward model from scratch."""

from __future__ import annotations

import argparse
from pathlib import Path


def _build(args) -> int:
    import torch

    from ..model import quiet_transformers
    from .build import DEFAULT_DIR, build

    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_transformers()
    build(args.out or DEFAULT_DIR, seed=args.seed, lm_steps=args.lm_steps, reward_steps=args.reward_steps)
    return 0


def add_toyworld_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``toyworld build`` under an ``argparse`` subparsers object; returns the ``toyworld`` parser."""
    p = subparsers.add_parser("toyworld", help="the toy text world (synthetic reviews, tiny LM, sentiment reward)")
    tw = p.add_subparsers(dest="toyworld_command", required=True)
    b = tw.add_parser("build", help="train the toy LM and reward model and write them (2-5 minutes on 2 CPU cores)")
    b.add_argument("--out", type=Path, default=None, help="output folder (default: the package's assets/toy, which configs use)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--lm-steps", type=int, default=1200)
    b.add_argument("--reward-steps", type=int, default=500)
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy shared machine)")
    b.set_defaults(func=_build)
    return p
