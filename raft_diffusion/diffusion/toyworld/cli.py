"""``raft-diffusion toyworld build``: train the toy world's models from scratch (seeded) into a folder."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _build(args) -> int:
    import dataclasses

    from raft_diffusion.core.errors import UserError
    from raft_diffusion.core.rundir import check_output_dir

    if args.only and args.parts:
        raise UserError("give --parts or --only, not both (--only flow = --parts flow)")
    parts = tuple(p.strip() for p in (args.only or args.parts or "rewards,sd,flow").split(",") if p.strip())
    unknown = set(parts) - {"rewards", "sd", "flow"}
    if unknown:
        raise UserError(f"unknown --parts {sorted(unknown)}: choose from rewards, sd, flow")
    if args.threads < 0:
        raise UserError(f"--threads must be >= 1, or 0 for torch's default (got {args.threads})")
    import torch

    from .build import ASSETS_DIR, BuildSettings, build

    out = Path(args.out) if args.out else ASSETS_DIR
    check_output_dir(out, "--out")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BuildSettings.miniature() if args.miniature else BuildSettings()
    settings = dataclasses.replace(settings, seed=args.seed)
    info = build(out, settings, parts=parts, log=lambda m: print(m, flush=True), jobs=max(1, args.jobs))
    print(f"toy world built in {out} ({info['seconds_this_call']:.0f}s wall)", flush=True)
    return 0


def add_toyworld_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``toyworld build`` under an ``argparse`` subparsers object; returns the ``toyworld`` parser."""
    p = subparsers.add_parser("toyworld", help="the toy text-to-image world (procedural shapes, small models)")
    sub = p.add_subparsers(dest="toyworld_command", required=True)
    b = sub.add_parser("build", help="train the toy CLIP, aesthetic head and text-to-image pipelines (UNet and flow-matching) from scratch")
    b.add_argument("--out", default=None, help="output folder (default: the packaged raft_diffusion/diffusion/toyworld/assets)")
    b.add_argument("--seed", type=int, default=0, help="build seed")
    b.add_argument("--parts", default=None, help="comma-separated parts to (re)build: rewards, sd, flow (default: all three)")
    b.add_argument(
        "--only",
        default=None,
        help="the same as --parts: `--only flow` trains only the flow-matching model on the folder's existing CLIP and VAE",
    )
    b.add_argument("--miniature", action="store_true", help="a few-minute build with briefly trained parts (tests)")
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default; jobs=1 only)")
    b.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="train the CLIP/head and the text-to-image model in parallel processes (1 thread each)",
    )
    b.set_defaults(func=_build)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raft-diffusion-toyworld")
    add_toyworld_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
