"""raft-diffusion: RAFT (Reward rAnked FineTuning) for diffusion models and causal LMs."""

__version__ = "0.1.0"
