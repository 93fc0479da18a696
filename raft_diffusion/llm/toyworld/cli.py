"""``raft-diffusion llm toyworld build``: train the toy text world's LM and reward model from scratch."""

from __future__ import annotations

import argparse
from pathlib import Path


def _build(args) -> int:
    from ...core.errors import UserError
    from ...core.rundir import check_output_dir

    for flag, value in (("--lm-steps", args.lm_steps), ("--reward-steps", args.reward_steps)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1 (got {value}): the build trains the model for that many steps")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1 (got {args.threads})")
    import torch

    from ..model import quiet_transformers
    from .build import DEFAULT_DIR, build

    out = args.out or DEFAULT_DIR
    check_output_dir(Path(out), "--out")  # before minutes of training, not after
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_transformers()
    build(out, seed=args.seed, lm_steps=args.lm_steps, reward_steps=args.reward_steps)
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
