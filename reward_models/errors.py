"""Errors raised by ``reward_models``.

Every error is a ``ValueError`` subclass whose message is one self-contained line: what went wrong,
what was looked for, and how to fix it. Callers (the raft-diffusion CLI) print them without a traceback.
"""

from __future__ import annotations


class RewardError(ValueError):
    """Base class: a reward could not be loaded, configured or evaluated."""

    def __init__(self, message: str):
        # Keep messages on one line so a CLI can print them as-is.
        super().__init__(" ".join(str(message).split()))


class UnknownRewardError(RewardError):
    """A reward name is not a built-in, not an entry point and not an importable ``module:function``."""


class RewardConfigError(RewardError):
    """A reward config dict or keyword argument is invalid."""


class RewardArgumentsError(RewardConfigError):
    """The keyword arguments given to a reward do not fit its factory (an unknown name, or a required one missing)."""


class RewardWeightsNotFoundError(RewardError):
    """The weights of a model-backed reward could not be found (never silently random)."""


class MissingDependencyError(RewardError, ImportError):
    """An optional package needed by a reward is not installed."""


class RewardOutputError(RewardError):
    """A reward returned something unusable: wrong shape, not a tensor, or all NaN."""


class RewardInputError(RewardError):
    """A reward was called with inputs of the wrong type or shape."""
