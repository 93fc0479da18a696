"""``raft-diffusion`` command line: wires the diffusion commands (align, gallery, compare, toyworld,
config-help) and the ``llm`` command group; each kind's CLI lives in its package.

Errors in the user's input print as one line (``error: ...``) with exit code 2, never a traceback wall.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .core.errors import run_command


def build_parser() -> argparse.ArgumentParser:
    from .diffusion.cli import add_commands
    from .llm.cli import add_llm_parser

    parser = argparse.ArgumentParser(prog="raft-diffusion", description="Reward rAnked FineTuning for diffusion models and causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    add_llm_parser(sub)
    _verbose_anywhere(sub)
    return parser


def _verbose_anywhere(sub) -> None:
    """Accept ``-v`` after the command too (``raft-diffusion align ... -v``), in every subcommand and nested group."""
    for parser in sub.choices.values():
        groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if groups:
            for group in groups:
                _verbose_anywhere(group)
        elif not any("-v" in a.option_strings for a in parser._actions):
            parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging and full tracebacks")


def _reward_errors() -> tuple[type[BaseException], ...]:
    """The reward package's errors, which are the user's to fix (imported only when an error is being reported)."""
    from reward_models.errors import RewardError

    return (RewardError,)


def main(argv: list[str] | None = None) -> int:
    from .core.malloc import keep_freed_memory

    keep_freed_memory()  # no page-fault churn from batch to batch (see core/malloc.py)
    from .diffusion import config as _diffusion_config  # noqa: F401  both kinds registered, so a config or run of
    from .llm import config as _llm_config  # noqa: F401  one kind given to the other's command is named as such

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_command(args, user_errors=_reward_errors)
    except BrokenPipeError:  # `raft-diffusion config-help | head`: the reader left; no traceback for that
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 1


if __name__ == "__main__":
    sys.exit(main())
