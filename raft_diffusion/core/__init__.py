"""Model-agnostic RAFT core: config, seeds, ranking, pool, run directory, stage loop.

Imports nothing from diffusers or transformers.
"""
from .config import RaftConfig, load_config
from .errors import ConfigError, RewardError, UserError
from .pool import StreamingPool
from .ranking import ranking_key, select
from .rundir import RunDir
from .seeds import eval_seed, sample_seed
from .types import Sample

__all__ = [
    "RaftConfig", "load_config", "ConfigError", "RewardError", "UserError", "StreamingPool",
    "ranking_key", "select", "RunDir", "eval_seed", "sample_seed", "Sample",
]
