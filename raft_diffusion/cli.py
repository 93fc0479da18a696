"""``raft-diffusion`` command line: align, config-help.

Errors in the user's input print as one line (``error: ...``) with exit code 2, never a traceback wall.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .core.errors import UserError


def _align(args) -> int:
    from .core.config import load_config
    from .core.loop import run_raft
    from .core.rundir import RunDir
    from .diffusion.adapter import DiffusionTask, resolve_pretrained

    cfg = load_config(args.config, args.overrides)
    cfg.model.pretrained = resolve_pretrained(cfg.model.pretrained)  # the snapshot names a real folder or hub id
    run = RunDir(args.output_dir)
    run.start(cfg.to_dict())
    print(f"raft-diffusion: run directory {run.root} (model {cfg.model.pretrained}, reward {cfg.reward})", flush=True)
    task = DiffusionTask(cfg)
    run_raft(cfg, task, run)
    print(f"done: LoRA in {run.final_dir}, metrics in {run.metrics_path}", flush=True)
    return 0


def _config_help(args) -> int:
    from .core.config import config_help

    print("\n".join(config_help()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raft-diffusion", description="Reward rAnked FineTuning for diffusion models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("align", help="run RAFT on a Stable Diffusion pipeline")
    p.add_argument("--config", "-c", type=Path, help="YAML preset, e.g. configs/tiny.yaml")
    p.add_argument("--output-dir", "-o", type=Path, required=True, help="run directory (resumed if it exists)")
    p.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. sampling.num_per_prompt=16")
    p.set_defaults(func=_align)

    p = sub.add_parser("config-help", help="list every config key with its default and meaning")
    p.set_defaults(func=_config_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (UserError, ValueError) as e:
        if args.verbose or not _is_user_facing(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last completed stage", file=sys.stderr)
        return 130


def _is_user_facing(e: Exception) -> bool:
    """Our own errors and the reward package's; other ValueErrors are bugs and keep their traceback."""
    if isinstance(e, UserError):
        return True
    try:
        from reward_models.errors import RewardError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, RewardError)


if __name__ == "__main__":
    sys.exit(main())
