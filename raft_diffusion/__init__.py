"""raft-diffusion: RAFT (Reward rAnked FineTuning) for diffusion models and causal LMs."""

__version__ = "0.1.0"

__all__ = ["load_prompts"]


def __getattr__(name):
    """``from raft_diffusion import load_prompts``: imported on first use (the package import stays light)."""
    if name == "load_prompts":
        from raft_diffusion.diffusion.prompts import load_prompts

        return load_prompts
    raise AttributeError(f"module 'raft_diffusion' has no attribute {name!r}")
