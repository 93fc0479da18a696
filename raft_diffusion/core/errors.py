"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """An invalid configuration value or key."""


class ScoreError(UserError):
    """What a task's ``score`` returned is unusable (wrong shape or type, all NaN); the message names the reward."""


def is_user_facing(e: BaseException, user_errors: tuple[type[BaseException], ...] = ()) -> bool:
    """Our own errors and those the caller names (e.g. the reward package's); other exceptions are bugs
    and keep their traceback."""
    return isinstance(e, (UserError, *user_errors))


def run_command(args, user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a CLI handler ``args.func(args)``: user errors (ours and ``user_errors``) print as one line (exit 2),
    Ctrl-C as a resume hint."""
    import sys

    try:
        return args.func(args)
    except (UserError, *user_errors) as e:
        if getattr(args, "verbose", False) or not is_user_facing(e, user_errors):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last completed stage", file=sys.stderr)
        return 130
