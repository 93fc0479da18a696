"""Model-agnostic RAFT core: base config, seeds, ranking, pool, run directory, stage loop, early stop,
shared helpers. A kind (``raft_diffusion.diffusion``, ``raft_diffusion.llm``) plugs in through
:class:`~raft_diffusion.core.task.RaftTask`.

Imports nothing from diffusers or transformers, nor from the kinds above it. The names below load on
first use, so that reading a config (``core.config``) does not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "BaseConfig": "config",
    "load_config": "config",
    "ConfigError": "errors",
    "ScoreError": "errors",
    "UserError": "errors",
    "StreamingPool": "pool",
    "ranking_key": "ranking",
    "select": "ranking",
    "RunDir": "rundir",
    "eval_seed": "seeds",
    "sample_seed": "seeds",
    "Sample": "types",
    "RaftTask": "task",
    "run_raft": "loop",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
