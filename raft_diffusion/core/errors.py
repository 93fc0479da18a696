"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """An invalid configuration value or key."""


class RewardError(UserError):
    """A reward returned something unusable (wrong shape, not a tensor, all NaN)."""


def is_user_facing(e: BaseException) -> bool:
    """Our own errors and the reward package's; other exceptions are bugs and keep their traceback."""
    if isinstance(e, UserError):
        return True
    try:
        from reward_models.errors import RewardError as RewardPackageError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, RewardPackageError)


def run_command(args) -> int:
    """Run a CLI handler ``args.func(args)``: user errors print as one line (exit 2), Ctrl-C as a resume hint."""
    import sys

    try:
        return args.func(args)
    except (UserError, ValueError) as e:
        if getattr(args, "verbose", False) or not is_user_facing(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last completed stage", file=sys.stderr)
        return 130
