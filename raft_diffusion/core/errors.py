"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """An invalid configuration value or key."""


class RewardError(UserError):
    """A reward returned something unusable (wrong shape, not a tensor, all NaN)."""
